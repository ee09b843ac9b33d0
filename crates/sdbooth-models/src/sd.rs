//! A whole Stable Diffusion model in memory: configuration plus the three parameter stores, and
//! the builtin models (`builtin:tiny-sd1`, ...) created from a seed.

use crate::init::random_params;
use crate::{clip, unet, vae, BuiltinModel, ModelConfig, ModelError, ParamStore};

/// A Stable Diffusion model: U-Net, text encoder and VAE under diffusers' names.
#[derive(Clone)]
pub struct StableDiffusion {
    pub config: ModelConfig,
    pub unet: ParamStore,
    pub text_encoder: ParamStore,
    pub vae: ParamStore,
}

impl StableDiffusion {
    /// Checks every part against the configuration's expected names and shapes; lists all
    /// problems of all parts.
    pub fn check_shapes(&self) -> Result<(), ModelError> {
        let mut problems = Vec::new();
        let parts = [
            ("unet", &self.unet, unet::param_shapes(&self.config.unet)),
            ("text_encoder", &self.text_encoder, clip::param_shapes(&self.config.text)),
            ("vae", &self.vae, vae::param_shapes(&self.config.vae)),
        ];
        for (part, store, shapes) in parts {
            if let Err(ModelError::ShapeMismatch(p)) = store.check_shapes(&shapes) {
                problems.extend(p.into_iter().map(|s| format!("{part}: {s}")));
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ModelError::ShapeMismatch(problems))
        }
    }
}

/// Builds a builtin model with seeded random weights (init.rs's generator). Each part gets its
/// own seed derived from the model's, so the three stores are independent streams; values do
/// not depend on the machine or thread count.
pub fn random_model(b: &BuiltinModel) -> Result<StableDiffusion, ModelError> {
    let cfg = &b.config;
    Ok(StableDiffusion {
        config: cfg.clone(),
        unet: random_params(&unet::param_shapes(&cfg.unet), b.seed)?,
        text_encoder: random_params(&clip::param_shapes(&cfg.text), b.seed.wrapping_add(1))?,
        vae: random_params(&vae::param_shapes(&cfg.vae), b.seed.wrapping_add(2))?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{builtin, clip::ClipTextModel, vae::Vae};
    use candle_core::{DType, Device, Tensor};

    fn count(shapes: &[(String, Vec<usize>)]) -> usize {
        shapes.iter().map(|(_, s)| s.iter().product::<usize>()).sum()
    }

    /// Parameter counts of the real architectures, as transformers/diffusers count them
    /// (CLIPTextModel, AutoencoderKL built from the same configs, tools/.venv, 2026-11-25).
    #[test]
    fn real_sizes_match_transformers_and_diffusers() {
        assert_eq!(count(&clip::param_shapes(&ModelConfig::sd1().text)), 123_060_480);
        assert_eq!(count(&clip::param_shapes(&ModelConfig::sd2_512().text)), 340_387_840);
        let vae = vae::param_shapes(&ModelConfig::sd1().vae);
        assert_eq!((count(&vae), vae.len()), (83_653_863, 248));
    }

    #[test]
    fn builtin_tiny_models_are_complete_and_reproducible() {
        for name in ["builtin:tiny-sd1", "builtin:tiny-sd2"] {
            let b = builtin(name).unwrap();
            let m = random_model(&b).unwrap();
            m.check_shapes().unwrap();
            let again = random_model(&b).unwrap();
            let key = "text_model.encoder.layers.0.mlp.fc1.weight";
            let (x, y) = (m.text_encoder.get(key).unwrap(), again.text_encoder.get(key).unwrap());
            assert_eq!(
                x.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                y.flatten_all().unwrap().to_vec1::<f32>().unwrap()
            );

            // The parts run: a text embedding and a decoded image of the expected shapes.
            let ids = Tensor::zeros((1, 77), DType::U32, &Device::Cpu).unwrap();
            let te = ClipTextModel::new(&m.config.text).encode(&m.text_encoder, &ids, None, None).unwrap();
            assert_eq!(te.dims(), &[1, 77, m.config.text.hidden_size]);
            let lat = Tensor::randn(0f32, 1f32, (1, 4, 2, 2), &Device::Cpu).unwrap();
            let img = Vae::new(&m.config.vae).decode_latents(&m.vae, &lat, None).unwrap();
            assert_eq!(img.dims(), &[1, 3, 16, 16]);
            assert!(img.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().all(|v| v.is_finite()));
        }
    }

    #[test]
    fn check_shapes_names_the_part() {
        let mut m = random_model(&builtin("tiny-sd1").unwrap()).unwrap();
        m.vae = ParamStore::new();
        match m.check_shapes() {
            Err(ModelError::ShapeMismatch(p)) => {
                assert!(p.iter().all(|s| s.starts_with("vae: missing")), "{p:?}")
            }
            other => panic!("expected a shape mismatch, got {:?}", other.err()),
        }
    }
}
