//! Any bytes as a prompt file (`--sample_prompts`, `generate --from_file`) in each of its three
//! forms (kohya's text lines with --n/--w/--h/--d/--l/--s, TOML, JSON), read by the parser the
//! trainer and `generate` use, size-checked as `generate` and training do before loading a model,
//! then merged with defaults into requests: Ok or Err, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sdbooth_sample::generate::Request;
use sdbooth_sample::prompts::{
    check_prompt_sizes, check_sample_prompt_sizes, kohya_sample_size, parse_prompt_line, read_prompt_file, rounding_notes,
    KOHYA_SAMPLE_SIZE,
};

fuzz_target!(|data: &[u8]| {
    let Some((&which, text)) = data.split_first() else { return };
    let ext = ["txt", "toml", "json"][which as usize % 3];
    let path = std::env::temp_dir().join(format!("sdbooth-prompts-fuzz-{}.{ext}", std::process::id()));
    if std::fs::write(&path, text).is_err() {
        return;
    }
    let defaults = Request {
        prompt: String::new(),
        negative_prompt: String::new(),
        width: 512,
        height: 512,
        steps: 20,
        scale: 7.5,
        seed: 0,
        sampler: "ddim".into(),
    };
    if let Ok(specs) = read_prompt_file(&path) {
        // The upfront size checks of `generate` and of training samples, then the requests.
        let _ = check_prompt_sizes(&path, &specs, (defaults.width, defaults.height));
        let _ = check_sample_prompt_sizes(&path, &specs, KOHYA_SAMPLE_SIZE);
        let _ = rounding_notes(&path, &specs, KOHYA_SAMPLE_SIZE);
        for spec in &specs {
            let mut req = Request::from_spec(spec, &defaults);
            (req.width, req.height) = kohya_sample_size((req.width, req.height));
            let _ = req.a1111_parameters("model");
        }
    }
    for line in String::from_utf8_lossy(text).lines() {
        let _ = parse_prompt_line(line);
    }
});
