//! sdbooth-train
