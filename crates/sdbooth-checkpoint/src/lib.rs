//! sdbooth-checkpoint
