//! sdbooth-data
