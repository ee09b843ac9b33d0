//! Any bytes as a checkpoint's data.pkl: the data-only pickle machine returns a value or an error,
//! never panics, never overflows the stack, and never resolves a global off the allow-list.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = sdbooth_checkpoint::pickle::load(data);
});
