//! TensorBoard event files, JSON-lines logs, training-state folders and kohya's naming rules.
//!
//! The event-file format was also checked once with the venv's tensorboard 2.21
//! (`EventAccumulator(dir).Reload().Scalars("loss")` returns the written values and steps); the
//! test below parses the file back and checks every CRC, so it needs no Python.

use std::collections::HashMap;

use candle_core::{Device, Tensor, Var};
use rand::RngCore;
use rand_chacha::rand_core::SeedableRng;
use rand_chacha::ChaCha8Rng;
use sdbooth_data::{Sampler, SamplerState, Streams};
use sdbooth_train::logs::{
    crc32c, encode_event, masked_crc32c, JsonlWriter, LossRecorder, StepRecord, TensorBoardWriter, TAG_LOSS,
    TAG_LR_UNET,
};
use sdbooth_train::optim::{Optimizer, OptimizerConfig, OptimizerKind};
use sdbooth_train::state::*;
use sdbooth_train::update::LossScale;

#[test]
fn crc32c_known_vectors() {
    // RFC 3720 / iSCSI check value.
    assert_eq!(crc32c(b"123456789"), 0xE306_9283);
    assert_eq!(crc32c(b""), 0);
    assert_eq!(crc32c(&[0u8; 32]), 0x8A91_36AA);
}

fn read_records(bytes: &[u8]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        let len_bytes = &bytes[i..i + 8];
        let len = u64::from_le_bytes(len_bytes.try_into().unwrap()) as usize;
        let crc_len = u32::from_le_bytes(bytes[i + 8..i + 12].try_into().unwrap());
        assert_eq!(crc_len, masked_crc32c(len_bytes));
        let data = &bytes[i + 12..i + 12 + len];
        let crc_data = u32::from_le_bytes(bytes[i + 12 + len..i + 16 + len].try_into().unwrap());
        assert_eq!(crc_data, masked_crc32c(data));
        out.push(data.to_vec());
        i += 16 + len;
    }
    out
}

#[test]
fn tensorboard_file_has_framed_events() {
    let dir = tempfile::tempdir().unwrap();
    let mut w = TensorBoardWriter::create(dir.path()).unwrap();
    w.add_scalars(&[(TAG_LOSS, 0.25), (TAG_LR_UNET, 1e-4)], 1).unwrap();
    w.add_scalar(TAG_LOSS, 0.125, 300).unwrap();
    let name = w.path().file_name().unwrap().to_string_lossy().into_owned();
    assert!(name.starts_with("events.out.tfevents."), "{name}");
    let recs = read_records(&std::fs::read(w.path()).unwrap());
    assert_eq!(recs.len(), 4);
    // The first event names the file version.
    assert!(recs[0].windows(13).any(|x| x == b"brain.Event:2"));
    // Scalar event: step 300 as a varint (0xAC 0x02), tag "loss", float 0.125.
    let last = &recs[3];
    assert_eq!(&last[9..12], &[0x10, 0xAC, 0x02]);
    assert!(last.windows(4).any(|x| x == b"loss"));
    assert!(last.windows(5).any(|x| x == [&[0x15u8][..], &0.125f32.to_le_bytes()].concat().as_slice()));
    // The encoder is deterministic given its inputs.
    assert_eq!(encode_event(1.5, 7, None, Some(("a", 1.0))), encode_event(1.5, 7, None, Some(("a", 1.0))));
}

#[test]
fn jsonl_appends_lines() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("logs/train.jsonl");
    for step in 1..=2 {
        let mut w = JsonlWriter::append(&p).unwrap();
        let r = StepRecord {
            step,
            epoch: 0,
            loss: 0.5,
            avr_loss: 0.5,
            lr_unet: 1e-4,
            lr_text_encoder: None,
            step_seconds: 1.0,
            peak_rss_bytes: Some(10),
        };
        w.write(&r).unwrap();
    }
    let text = std::fs::read_to_string(&p).unwrap();
    let lines: Vec<StepRecord> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.iter().map(|r| r.step).collect::<Vec<_>>(), vec![1, 2]);
    assert!(!text.contains("lr_text_encoder"));
}

#[test]
fn loss_recorder_is_kohyas_moving_average() {
    let mut r = LossRecorder::default();
    r.add(0, 0, 1.0);
    r.add(0, 1, 3.0);
    assert_eq!(r.moving_average(), 2.0);
    // Second epoch replaces step 0's slot.
    r.add(1, 0, 5.0);
    assert_eq!(r.moving_average(), 4.0);
}

#[test]
fn kohya_names() {
    assert_eq!(step_state_name(Some("m"), 10), "m-step00000010-state");
    assert_eq!(epoch_state_name(Some("m"), 3), "m-000003-state");
    assert_eq!(last_state_name(Some("m")), "m-state");
    assert_eq!(step_state_name(None, 10), "at-step00000010-state");
    assert_eq!(epoch_state_name(None, 1), "epoch-000001-state");
    assert_eq!(last_state_name(None), "last-state");
    assert_eq!(epoch_file_name(None, 2, ".safetensors"), "epoch-000002.safetensors");
    assert_eq!(step_file_name(Some("m"), 20, ".ckpt"), "m-step00000020.ckpt");
    assert_eq!(last_file_name(None, ".safetensors"), "last.safetensors");
}

#[test]
fn save_last_n_pruning_matches_kohya() {
    // save_every_n_steps=10, save_last_n_steps=30: at step 50 keep 30 steps' worth, remove 10.
    assert_eq!(remove_step_no(50, 10, Some(30)), Some(10));
    assert_eq!(remove_step_no(30, 10, Some(30)), None);
    assert_eq!(remove_step_no(40, 10, Some(30)), Some(0));
    assert_eq!(remove_state_step_no(40, 10, Some(30)), None, "state pruning needs > 0");
    assert_eq!(remove_step_no(50, 10, None), None);
    assert_eq!(remove_epoch_no(5, 1, Some(2)), Some(3));
    assert_eq!(remove_epoch_no(1, 1, Some(2)), None);
    assert_eq!(remove_epoch_no(6, 2, Some(2)), Some(2));
}

#[test]
fn rng_state_roundtrip_continues_the_stream() {
    let mut a = ChaCha8Rng::seed_from_u64(7);
    for _ in 0..13 {
        a.next_u32();
    }
    let s = RngState::capture(&a);
    let json = serde_json::to_string(&s).unwrap();
    let mut b = serde_json::from_str::<RngState>(&json).unwrap().restore().unwrap();
    for _ in 0..100 {
        assert_eq!(a.next_u64(), b.next_u64());
    }
    assert!(RngState { seed: "zz".into(), stream: 0, word_pos: "0".into() }.restore().is_err());
}

fn small_state(step: u64) -> (RunState, Optimizer, HashMap<String, Tensor>) {
    let w = Var::from_tensor(&Tensor::arange(0f32, 12.0, &Device::Cpu).unwrap()).unwrap();
    let mut opt = Optimizer::new(OptimizerConfig::new(OptimizerKind::AdamW));
    opt.add_group("unet", 1e-3, vec!["w".into()]);
    let g = Tensor::ones(12, candle_core::DType::F32, &Device::Cpu).unwrap();
    opt.step_param("w", &w, &g, 1e-3).unwrap();
    let sampler = Sampler::from(SamplerState { seed: 7, epoch: 2, next_batch: 3 });
    let mut st = RunState::start(Streams::new(step), sampler, Some(LossScale::default()));
    st.global_step = step;
    // Streams part-way through, as a run leaves them.
    for _ in 0..step {
        st.noise_rng.next_u32();
    }
    st.vae_rng.next_u64();
    st.loss_recorder.add(0, 0, 0.5);
    (st, opt, HashMap::from([("w".to_string(), w.as_tensor().clone())]))
}

#[test]
fn state_folder_roundtrip_and_latest() {
    let out = tempfile::tempdir().unwrap();
    assert_eq!(find_latest_state(out.path()).unwrap(), None);
    for step in [10, 20] {
        let (st, opt, w) = small_state(step);
        save_state(&out.path().join(step_state_name(Some("m"), step)), &st, &opt, &w).unwrap();
    }
    // A leftover temporary folder of an interrupted save and an unrelated folder are ignored.
    std::fs::create_dir_all(out.path().join(".m-step00000030-state.tmp-1")).unwrap();
    std::fs::create_dir_all(out.path().join("m-step00000040-state")).unwrap();
    let latest = find_latest_state(out.path()).unwrap().unwrap();
    assert!(latest.ends_with("m-step00000020-state"), "{latest:?}");
    let (mut st, opt, w) = load_state(&latest, &Device::Cpu).unwrap();
    let (mut want_st, want_opt, want_w) = small_state(20);
    let json = |s: &RunState| serde_json::to_value(s).unwrap();
    assert_eq!(json(&st), json(&want_st));
    // The streams continue where they were saved.
    assert_eq!(st.noise_rng.next_u64(), want_st.noise_rng.next_u64());
    assert_eq!(st.vae_rng.next_u64(), want_st.vae_rng.next_u64());
    assert_eq!(st.sampler.state(), SamplerState { seed: 7, epoch: 2, next_batch: 3 });
    // (last_lr is informational and not saved.)
    let strip =
        |o: &Optimizer| o.states.iter().map(|(k, s)| (k.clone(), s.step, s.bufs.clone())).collect::<Vec<_>>();
    assert_eq!(strip(&opt), strip(&want_opt));
    assert_eq!(opt.groups, want_opt.groups);
    assert_eq!(w["w"].to_vec1::<f32>().unwrap(), want_w["w"].to_vec1::<f32>().unwrap());
    // Overwriting the end-of-training state replaces it whole.
    let last = out.path().join(last_state_name(Some("m")));
    let (st, opt, w) = small_state(5);
    save_state(&last, &st, &opt, &w).unwrap();
    let (st, opt, w) = small_state(6);
    save_state(&last, &st, &opt, &w).unwrap();
    assert_eq!(read_state_json(&last).unwrap().global_step, 6);
    assert!(remove_if_exists(&last).unwrap());
    assert!(!remove_if_exists(&last).unwrap());
}

#[test]
fn failed_save_keeps_previous_state() {
    let out = tempfile::tempdir().unwrap();
    let dir = out.path().join("m-state");
    let (st, opt, w) = small_state(3);
    save_state(&dir, &st, &opt, &w).unwrap();
    let r = write_dir_atomic(&dir, |tmp| {
        std::fs::write(tmp.join("state.json"), b"{half").unwrap();
        Err(sdbooth_train::TrainError::Internal("a failure while writing".into()))
    });
    assert!(r.is_err());
    assert_eq!(read_state_json(&dir).unwrap().global_step, 3);
}
