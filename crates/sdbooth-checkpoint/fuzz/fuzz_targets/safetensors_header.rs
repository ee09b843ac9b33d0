//! Any bytes as a .safetensors file: the header parser returns Ok or Err, never panics, and every
//! entry it accepts lies inside the file without overlapping another.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok((entries, _meta)) = sdbooth_checkpoint::safetensors_io::parse_file_bytes(data) {
        let mut end = 0u64;
        for e in &entries {
            assert!(e.offset >= end, "overlap");
            end = e.offset + e.nbytes;
            assert!(end <= data.len() as u64, "entry past the end");
        }
    }
});
