//! Round trips between every format, bit-exact, against kohya's converter output (fixtures made
//! by tools/checkpoint/make_tiny_fixtures.py) and for the builtin tiny models.

mod common;

use std::path::Path;

use common::{assert_same, fixtures, raw_tensors};
use sdbooth_checkpoint::{
    load_model, save_model, LoadOptions, LoadedModel, Precision, SaveFormat, SaveOptions, TensorIndex,
};

fn load(spec: &Path) -> LoadedModel {
    load_model(spec.to_str().unwrap(), &LoadOptions::default()).unwrap()
}

fn save(m: &LoadedModel, path: &Path, format: SaveFormat, with_source: bool) {
    let mut o = SaveOptions::new(format);
    o.source = if with_source { Some(&m.source) } else { None };
    o.v_parameterization = m.v_parameterization;
    save_model(path, &m.parts(), &m.config, &o).unwrap();
}

fn assert_model_eq(a: &LoadedModel, b: &LoadedModel, what: &str) {
    assert_same(&a.unet, &b.unet, &format!("{what} unet"));
    assert_same(&a.text_encoder, &b.text_encoder, &format!("{what} text"));
    assert_same(&a.vae, &b.vae, &format!("{what} vae"));
}

/// Our single-file writer, fed a Diffusers folder, writes what kohya's converter writes: same keys,
/// dtypes, shapes and bytes (SD2: kohya's filler keys aside, see the fixture script).
#[test]
fn diffusers_to_single_file_matches_kohya() {
    let dir = tempfile::tempdir().unwrap();
    for name in ["sd1", "sd2"] {
        let m = load(&fixtures().join(format!("tiny-{name}-diffusers")));
        assert_eq!(m.config.v2, name == "sd2");
        let out = dir.path().join(format!("{name}.safetensors"));
        save(&m, &out, SaveFormat::Safetensors, true);
        let ours = raw_tensors(&out);
        let kohya = raw_tensors(&fixtures().join(format!("kohya-{name}.safetensors")));
        let filler = |k: &str| {
            k.contains("resblocks.2.") || k.ends_with("text_projection") || k.ends_with("logit_scale")
        };
        assert_eq!(
            ours.keys().collect::<Vec<_>>(),
            kohya.keys().collect::<Vec<_>>(),
            "{name}: key sets differ"
        );
        for (k, v) in &kohya {
            assert!(ours[k] == *v, "{name}: {k} differs from kohya's");
        }
        if name == "sd2" {
            // SD2 filler: block 2 (the tiny model's "24th") copies block 1; text_projection, logit_scale.
            assert!(ours.keys().any(|k| filler(k)));
            let a = &ours["cond_stage_model.model.transformer.resblocks.2.attn.in_proj_weight"];
            assert_eq!(a, &ours["cond_stage_model.model.transformer.resblocks.1.attn.in_proj_weight"]);
            assert!(m.v_parameterization, "v_prediction scheduler not picked up");
            let yaml = std::fs::read_to_string(out.with_extension("yaml")).unwrap();
            assert!(yaml.contains("parameterization: \"v\""));
        }
    }
}

/// kohya's single files load to exactly the Diffusers folder's tensors (fp32 and fp16).
#[test]
fn kohya_single_file_loads_like_diffusers() {
    for name in ["sd1", "sd2"] {
        let a = load(&fixtures().join(format!("kohya-{name}.safetensors")));
        let b = load(&fixtures().join(format!("tiny-{name}-diffusers")));
        assert_model_eq(&a, &b, name);
        // SD2 files hold OpenCLIP's last block, text_projection and logit_scale, which nothing uses.
        let unused = &a.source.unused_keys;
        let expect = if name == "sd1" { 0 } else { 14 };
        assert_eq!(unused.len(), expect, "{unused:?}");
        assert!(unused.iter().all(|k| k.contains("resblocks.2.")
            || k.ends_with("text_projection")
            || k.ends_with("logit_scale")));
    }
}

/// A .ckpt source: epoch/step add up, keys we do not train survive bit-identical, in both outputs.
#[test]
fn ckpt_source_keeps_untrained_keys_and_counters() {
    let dir = tempfile::tempdir().unwrap();
    let src = fixtures().join("source-sd1.ckpt");
    let m = load(&src);
    assert_model_eq(&m, &load(&fixtures().join("tiny-sd1-diffusers")), "ckpt vs diffusers");
    assert_eq!(m.source.unused_keys.len(), 4, "{:?}", m.source.unused_keys);
    let ix = m.source.index.as_ref().unwrap();
    assert_eq!((ix.epoch, ix.global_step), (Some(3), Some(42)));
    let src_raw = raw_tensors(&src);
    for (fmt, file) in [(SaveFormat::Ckpt, "out.ckpt"), (SaveFormat::Safetensors, "out.safetensors")] {
        let out = dir.path().join(file);
        let mut o = SaveOptions::new(fmt);
        o.source = Some(&m.source);
        o.epoch = 1;
        o.global_step = 10;
        save_model(&out, &m.parts(), &m.config, &o).unwrap();
        let got = raw_tensors(&out);
        assert_eq!(got.len(), src_raw.len());
        for (k, v) in &src_raw {
            assert!(got[k] == *v, "{file}: {k} changed");
        }
        if fmt == SaveFormat::Ckpt {
            let ix = TensorIndex::open(&out).unwrap();
            assert_eq!((ix.epoch, ix.global_step), (Some(4), Some(52)));
        }
        assert_model_eq(&load(&out), &m, file);
    }
}

/// builtin → every format → back, bit-exact; single file → Diffusers → single file keeps every
/// shared tensor.
#[test]
fn builtin_round_trips_through_every_format() {
    let dir = tempfile::tempdir().unwrap();
    for name in ["tiny-sd1", "tiny-sd2"] {
        let m = load_model(&format!("builtin:{name}"), &LoadOptions::default()).unwrap();
        let st = dir.path().join(format!("{name}.safetensors"));
        save(&m, &st, SaveFormat::Safetensors, true);
        let from_st = load(&st);
        assert_model_eq(&m, &from_st, "safetensors");
        assert_eq!(from_st.config.name, m.config.name, "architecture not recognised");
        // single file → internal → single file: every key bit-identical.
        let st2 = dir.path().join(format!("{name}-2.safetensors"));
        save(&from_st, &st2, SaveFormat::Safetensors, true);
        assert!(raw_tensors(&st) == raw_tensors(&st2), "{name}: single-file round trip");
        let ck = dir.path().join(format!("{name}.ckpt"));
        save(&from_st, &ck, SaveFormat::Ckpt, true);
        assert!(raw_tensors(&st) == raw_tensors(&ck), "{name}: safetensors → ckpt");
        for fmt in [SaveFormat::Diffusers, SaveFormat::DiffusersSafetensors] {
            let d = dir.path().join(format!("{name}-{fmt:?}"));
            save(&from_st, &d, fmt, true);
            for f in [
                "model_index.json",
                "tokenizer/vocab.json",
                "tokenizer/merges.txt",
                "scheduler/scheduler_config.json",
            ] {
                assert!(d.join(f).is_file(), "{fmt:?}: {f} missing");
            }
            let from_d = load(&d);
            assert_model_eq(&m, &from_d, &format!("{fmt:?}"));
            let back = dir.path().join(format!("{name}-{fmt:?}.safetensors"));
            save(&from_d, &back, SaveFormat::Safetensors, true);
            assert!(raw_tensors(&st) == raw_tensors(&back), "{name}: single → {fmt:?} → single");
        }
    }
}

#[test]
fn save_precision_converts_every_trained_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let m = load_model("builtin:tiny-sd1", &LoadOptions::default()).unwrap();
    for (p, dt) in [(Precision::Fp16, candle_core::DType::F16), (Precision::Bf16, candle_core::DType::BF16)] {
        let out = dir.path().join(format!("{p:?}.safetensors"));
        let mut o = SaveOptions::new(SaveFormat::Safetensors);
        o.precision = Some(p);
        save_model(&out, &m.parts(), &m.config, &o).unwrap();
        let back = load(&out);
        for (k, t) in &m.unet {
            let want = t.to_dtype(dt).unwrap();
            assert!(common::bytes(&want) == common::bytes(&back.unet[k]), "{k}");
        }
    }
}

#[test]
fn v2_flag_mismatch_is_explained() {
    let p = fixtures().join("kohya-sd2.safetensors");
    let e =
        load_model(p.to_str().unwrap(), &LoadOptions { v2: Some(false), ..Default::default() }).unwrap_err();
    assert!(e.to_string().contains("add --v2"), "{e}");
    let p = fixtures().join("kohya-sd1.safetensors");
    let e =
        load_model(p.to_str().unwrap(), &LoadOptions { v2: Some(true), ..Default::default() }).unwrap_err();
    assert!(e.to_string().contains("remove --v2"), "{e}");
}

#[test]
fn separate_vae_replaces_the_models() {
    // A VAE-only SD file: kohya-sd1's first_stage_model.* keys without the prefix.
    let dir = tempfile::tempdir().unwrap();
    let src = fixtures().join("kohya-sd1.safetensors");
    let base = load(&src);
    let vae_only = dir.path().join("vae.safetensors");
    let ix = TensorIndex::open(&src).unwrap();
    let tensors: Vec<_> = ix
        .entries
        .iter()
        .filter_map(|e| {
            let key = e.key.strip_prefix("first_stage_model.")?.to_string();
            Some(sdbooth_checkpoint::tensor_file::OutTensor {
                key,
                dtype: e.dtype,
                shape: e.shape.clone(),
                data: sdbooth_checkpoint::tensor_file::OutData::Raw { path: src.clone(), offset: e.offset },
            })
        })
        .collect();
    sdbooth_checkpoint::safetensors_io::write_safetensors(&vae_only, &tensors, &Default::default()).unwrap();
    let opts = LoadOptions { vae: Some(vae_only), ..Default::default() };
    // The SD2 fixture has the same VAE architecture but other (fp16) weights.
    let sd2 = fixtures().join("tiny-sd2-diffusers");
    let own = load(&sd2);
    let with_vae = load_model(sd2.to_str().unwrap(), &opts).unwrap();
    assert_same(&with_vae.vae, &base.vae, "--vae");
    assert_same(&with_vae.unet, &own.unet, "unet untouched");
    assert!(
        common::bytes(&own.vae["decoder.conv_out.weight"])
            != common::bytes(&base.vae["decoder.conv_out.weight"])
    );
}
