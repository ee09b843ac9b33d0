//! sdbooth-sample
