//! LR schedules against transformers' functions called with kohya's argument mapping
//! (fixture: tools/goldens/optim.py --lr). The schedules are built as the trainer builds them:
//! from the command line, resolved into a `TrainPlan`, through `setup::lr_schedule`.

use sdbooth_train::args::TrainArgs;
use sdbooth_train::lr::LrSchedule;
use sdbooth_train::plan::TrainPlan;
use sdbooth_train::trainer::setup;

/// The schedule `sdbooth train <flags>` trains with over `total` steps.
fn schedule(flags: &[String], total: u64) -> sdbooth_train::Result<LrSchedule> {
    let args = TrainArgs::try_parse_from(flags).expect("flags parse");
    setup::lr_schedule(&TrainPlan::resolve(&args)?, total)
}

fn flags(pairs: &[(&str, String)]) -> Vec<String> {
    pairs.iter().flat_map(|(k, v)| [format!("--{k}"), v.clone()]).collect()
}

#[test]
fn schedules_match_transformers() {
    let text =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/lr.json")).unwrap();
    let fx: serde_json::Value = serde_json::from_str(&text).unwrap();
    let total = fx["total"].as_u64().unwrap();
    let base = fx["base_lr"].as_f64().unwrap();
    let cases = fx["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 12);
    for c in cases {
        let name = c["name"].as_str().unwrap();
        let mut f = vec![
            ("learning_rate", base.to_string()),
            ("lr_scheduler", c["lr_scheduler"].as_str().unwrap().to_string()),
            ("lr_warmup_steps", c["lr_warmup_steps"].as_str().unwrap().to_string()),
            ("lr_decay_steps", c["lr_decay_steps"].as_str().unwrap().to_string()),
            ("lr_scheduler_num_cycles", c["num_cycles"].as_u64().unwrap().to_string()),
            ("lr_scheduler_power", c["power"].as_f64().unwrap().to_string()),
        ];
        if let Some(t) = c["timescale"].as_u64() {
            f.push(("lr_scheduler_timescale", t.to_string()));
        }
        if let Some(r) = c["min_lr_ratio"].as_f64() {
            f.push(("lr_scheduler_min_lr_ratio", r.to_string()));
        }
        let s = schedule(&flags(&f), total).unwrap();
        for (k, want) in c["multipliers"].as_array().unwrap().iter().enumerate() {
            let want = want.as_f64().unwrap();
            let got = s.lr(base, k as u64) / base;
            assert!((got - want).abs() <= 1e-12 + 1e-9 * want.abs(), "{name} step {k}: {got} != {want}");
        }
    }
}

#[test]
fn kohya_int_or_float() {
    let warmup = |v: &str| {
        let f = flags(&[("lr_scheduler", "constant_with_warmup".into()), ("lr_warmup_steps", v.into())]);
        TrainArgs::try_parse_from(&f).map(|_| schedule(&f, 1000).unwrap().warmup)
    };
    assert_eq!(warmup("10").unwrap(), 10);
    assert_eq!(warmup("0.1").unwrap(), 100, "a value < 1 is a ratio of the total steps");
    assert_eq!(warmup("5%").unwrap(), 50);
    assert!(warmup("2.5").is_err(), "Python's int('2.5') fails");
    assert!(warmup("abc").is_err());
}

#[test]
fn invalid_schedules_are_refused() {
    let refused = |pairs: &[(&str, String)]| schedule(&flags(pairs), 100).is_err();
    assert!(refused(&[("lr_warmup_steps", "5".into())]), "constant with warmup");
    assert!(refused(&[("lr_scheduler", "cosine_with_min_lr".into())]), "min lr ratio missing");
    assert!(refused(&[("lr_scheduler", "adafactor_magic".into())]));
}
