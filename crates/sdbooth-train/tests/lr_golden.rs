//! LR schedules against transformers' functions called with kohya's argument mapping
//! (fixture: tools/goldens/optim.py --lr).

use sdbooth_train::lr::{LrSchedule, LrSchedulerArgs, StepsOrRatio};

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
        let args = LrSchedulerArgs {
            lr_scheduler: c["lr_scheduler"].as_str().unwrap().to_string(),
            lr_warmup_steps: StepsOrRatio::parse(c["lr_warmup_steps"].as_str().unwrap()).unwrap(),
            lr_decay_steps: StepsOrRatio::parse(c["lr_decay_steps"].as_str().unwrap()).unwrap(),
            lr_scheduler_num_cycles: c["num_cycles"].as_u64().unwrap(),
            lr_scheduler_power: c["power"].as_f64().unwrap(),
            lr_scheduler_timescale: c["timescale"].as_u64(),
            lr_scheduler_min_lr_ratio: c["min_lr_ratio"].as_f64(),
        };
        let s = LrSchedule::new(&args, total, base).unwrap();
        for (k, want) in c["multipliers"].as_array().unwrap().iter().enumerate() {
            let want = want.as_f64().unwrap();
            let got = s.multiplier(k as u64);
            assert!((got - want).abs() <= 1e-12 + 1e-9 * want.abs(), "{name} step {k}: {got} != {want}");
        }
    }
}

#[test]
fn kohya_int_or_float() {
    assert_eq!(StepsOrRatio::parse("10").unwrap(), StepsOrRatio::Steps(10));
    assert_eq!(StepsOrRatio::parse("0.1").unwrap(), StepsOrRatio::Ratio(0.1));
    assert_eq!(StepsOrRatio::parse("5%").unwrap(), StepsOrRatio::Ratio(0.05));
    assert_eq!(StepsOrRatio::parse("0.1").unwrap().resolve(1000), 100);
    assert!(StepsOrRatio::parse("2.5").is_err(), "Python's int('2.5') fails");
    assert!(StepsOrRatio::parse("abc").is_err());
}

#[test]
fn invalid_schedules_are_refused() {
    let mut a = LrSchedulerArgs { lr_warmup_steps: StepsOrRatio::Steps(5), ..Default::default() };
    assert!(LrSchedule::new(&a, 100, 1e-4).is_err(), "constant with warmup");
    a.lr_scheduler = "cosine_with_min_lr".into();
    assert!(LrSchedule::new(&a, 100, 1e-4).is_err(), "min lr ratio missing");
    a.lr_scheduler = "adafactor_magic".into();
    assert!(LrSchedule::new(&a, 100, 1e-4).is_err());
}
