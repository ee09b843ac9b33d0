//! With no single-file source, the SD1.5 and SD2.1 key sets, shapes and dtypes we write equal what
//! kohya's model_util writes (fixture: tools/checkpoint/kohya_keyset.py, run on kohya's code).
//! Shape level only: the parts are zero-stride broadcast tensors, so no 4 GB model is allocated.

mod common;

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor};
use sdbooth_checkpoint::single_file::plan_single_file;
use sdbooth_checkpoint::{KeyMap, ModelParts, Part, TensorMap};

fn lazy_parts(map: &KeyMap, part: Part) -> TensorMap {
    let zero = Tensor::zeros((), DType::F32, &Device::Cpu).unwrap();
    map.hf_shapes(part).into_iter().map(|(k, s)| (k, zero.broadcast_as(s).unwrap())).collect()
}

#[test]
fn no_source_key_set_matches_kohya() {
    let text = std::fs::read_to_string(common::fixtures().join("kohya_keyset.json")).unwrap();
    let fixture: serde_json::Value = serde_json::from_str(&text).unwrap();
    for (name, builtin) in [("sd15", "builtin:sd15-random"), ("sd21", "builtin:sd21-random")] {
        let cfg = sdbooth_models::builtin(builtin).unwrap().config;
        let map = KeyMap::new(&cfg);
        let (u, t, v) =
            (lazy_parts(&map, Part::Unet), lazy_parts(&map, Part::TextEncoder), lazy_parts(&map, Part::Vae));
        let parts = ModelParts { unet: &u, text_encoder: &t, vae: Some(&v) };
        let plan = plan_single_file(&parts, &cfg, None, None).unwrap();
        let ours: BTreeMap<String, (Vec<usize>, String)> =
            plan.iter().map(|o| (o.key.clone(), (o.shape.clone(), o.dtype.to_string()))).collect();
        let theirs: BTreeMap<String, (Vec<usize>, String)> = fixture[name]
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, v)| {
                let shape =
                    v["shape"].as_array().unwrap().iter().map(|d| d.as_u64().unwrap() as usize).collect();
                (k.clone(), (shape, v["dtype"].as_str().unwrap().to_string()))
            })
            .collect();
        let only_ours: Vec<&String> = ours.keys().filter(|k| !theirs.contains_key(*k)).collect();
        let only_theirs: Vec<&String> = theirs.keys().filter(|k| !ours.contains_key(*k)).collect();
        assert!(
            only_ours.is_empty() && only_theirs.is_empty(),
            "{name}: ours only {only_ours:?}, kohya only {only_theirs:?}"
        );
        for (k, v) in &theirs {
            assert_eq!(&ours[k], v, "{name}: {k}");
        }
        assert_eq!(ours.len(), if name == "sd15" { 1130 } else { 1228 });
    }
}
