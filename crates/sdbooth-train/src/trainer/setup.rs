//! What a run builds from its plan before the first step: the model (on the plan's device),
//! where models are written, the dataset, the optimizer and the LR schedule.

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use sdbooth_checkpoint::{load_model, LoadOptions, LoadedModel, SaveFormat};
use sdbooth_data::tokenizer::ClipTokenizer;
use sdbooth_data::DatasetGroup;
use sdbooth_models::{ClipTextModel, ModelConfig, ParamStore, Prediction, UNet, Vae};

use crate::error::{Result, TrainError};
use crate::loss::LossArgs;
use crate::lr::LrSchedule;
use crate::optim::Optimizer;
use crate::plan::TrainPlan;
use crate::update::Part;

/// The trainable model: fp32 master weights of U-Net and text encoder, the frozen VAE.
pub struct Model {
    pub config: ModelConfig,
    pub v_parameterization: bool,
    pub unet: UNet,
    pub unet_params: ParamStore,
    pub text_encoder: ClipTextModel,
    pub text_params: ParamStore,
    pub vae: Vae,
    /// Dropped after latent caching when nothing else needs it.
    pub vae_params: Option<ParamStore>,
    pub tokenizer: ClipTokenizer,
    /// What the checkpoint was loaded from (single-file sources are laid under saved weights).
    pub loaded: LoadedModel,
}

/// Loaded tensors as parameters of `dtype` on `device`, consuming the map: each loaded tensor is
/// dropped as soon as its parameter exists, so loading never holds two copies of the model (it
/// did: the peak RSS of the lean modes was set here, at twice the model's size, not by training).
/// A loaded tensor that already is a variable of the right dtype becomes the parameter as it is.
fn to_store(
    map: std::collections::BTreeMap<String, Tensor>,
    dtype: DType,
    device: &Device,
) -> Result<ParamStore> {
    let mut store = ParamStore::new();
    for (k, t) in map {
        let t = t.to_dtype(dtype)?.to_device(device)?;
        store.insert(k, t)?;
    }
    Ok(store)
}

/// Loads the model named by the plan, its trained parts in the plan's weight dtype, all of it
/// on the plan's device.
pub fn load(plan: &TrainPlan) -> Result<Model> {
    let spec = plan.model.spec()?;
    let opts = LoadOptions {
        v2: if plan.model.v2 { Some(true) } else { None },
        v_parameterization: plan.model.v_parameterization,
        vae: plan.model.vae.clone(),
        dtype: None,
    };
    let mut loaded = load_model(spec, &opts)
        .map_err(|e| TrainError::LoadModel { spec: spec.to_string(), source: Box::new(e) })?;
    if loaded.config.v2 && !plan.model.v2 {
        tracing::warn!("{spec} is an SD 2.x model; kohya needs --v2 for it, sdbooth detected it");
    }
    let device = &plan.device;
    // The loaded maps are left empty: saving needs only the source info beside them.
    let unet_params = to_store(std::mem::take(&mut loaded.unet), plan.precision.weight_dtype, device)?;
    let text_params =
        to_store(std::mem::take(&mut loaded.text_encoder), plan.precision.weight_dtype, device)?;
    // The VAE only encodes (and decodes samples): f32 unless mixed precision asks otherwise.
    let vae_params = to_store(std::mem::take(&mut loaded.vae), DType::F32, device)?;
    let tokenizer = if loaded.config.v2 { ClipTokenizer::sd2() } else { ClipTokenizer::sd1() }
        .map_err(|e| TrainError::Internal(format!("the built-in CLIP tokenizer: {e}")))?;
    let v_parameterization = loaded.v_parameterization
        || loaded.config.prediction == Prediction::VPrediction
        || plan.model.v_parameterization;
    Ok(Model {
        unet: UNet::new(&loaded.config.unet),
        text_encoder: ClipTextModel::new(&loaded.config.text),
        vae: Vae::new(&loaded.config.vae),
        config: loaded.config.clone(),
        v_parameterization,
        unet_params,
        text_params,
        vae_params: Some(vae_params),
        tokenizer,
        loaded,
    })
}

impl Model {
    /// The plan's loss settings for this model (v-prediction when the model or the flags say so).
    pub fn loss_args(&self, plan: &TrainPlan) -> LossArgs {
        LossArgs { v_parameterization: self.v_parameterization, ..plan.loss.clone() }
    }
}

/// The optimizer over the U-Net and, when it trains, the text encoder.
pub fn build_optimizer(plan: &TrainPlan, model: &Model, train_text_encoder: bool) -> Result<Optimizer> {
    let o = &plan.optimizer;
    let mut opt = Optimizer::new(o.config.clone());
    opt.add_group(Part::Unet.group_name(), o.learning_rate, model.unet_params.names().cloned().collect());
    if train_text_encoder {
        opt.add_group(
            Part::TextEncoder.group_name(),
            o.learning_rate_te,
            model.text_params.names().cloned().collect(),
        );
    }
    Ok(opt)
}

pub fn lr_schedule(plan: &TrainPlan, total_steps: u64) -> Result<LrSchedule> {
    LrSchedule::new(&plan.lr, total_steps, plan.optimizer.learning_rate)
}

/// Where and in which format models are written.
pub struct Output {
    pub dir: PathBuf,
    pub name: Option<String>,
    pub format: SaveFormat,
}

/// The final model must not replace the base model it is trained from (its untrained keys are
/// copied from that file when saving): refused before the model is loaded, not after training.
pub fn refuse_replacing_the_source(plan: &TrainPlan) -> Result<()> {
    let Some(spec) = plan.model.spec.as_deref() else { return Ok(()) };
    let source = std::path::Path::new(spec);
    let (true, Some(dir)) = (source.is_file(), plan.saving.output_dir.as_deref()) else { return Ok(()) };
    // Without --save_model_as a single-file source is saved in its own format (kohya's rule).
    let format = plan.saving.format.unwrap_or_else(|| SaveFormat::from_path(source));
    let name = crate::state::last_file_name(plan.saving.output_name.as_deref(), format.extension());
    let target = dir.join(name);
    let same = std::fs::canonicalize(source)
        .ok()
        .zip(std::fs::canonicalize(&target).ok())
        .is_some_and(|(a, b)| a == b);
    if same {
        return Err(TrainError::Config(format!(
            "the final model {} would replace the base model --pretrained_model_name_or_path {spec}, \
             which saving reads from: choose another --output_name or --output_dir",
            target.display()
        )));
    }
    Ok(())
}

impl Output {
    pub fn new(plan: &TrainPlan, model: &Model) -> Result<Self> {
        let dir = plan.output_dir()?.to_path_buf();
        std::fs::create_dir_all(&dir).map_err(|e| TrainError::io(&dir, e))?;
        let source_format = SaveFormat::of_source(&model.loaded.source);
        let format = match plan.saving.format {
            Some(f) => f,
            None if plan.saving.use_safetensors && !source_format.is_single_file() => {
                SaveFormat::DiffusersSafetensors
            }
            None => source_format,
        };
        Ok(Output { dir, name: plan.saving.output_name.clone(), format })
    }

    /// File or folder path for a model file name from `state::*_file_name`.
    pub fn path(&self, file_name: &str) -> PathBuf {
        self.dir.join(file_name)
    }

    /// The final model: `{output_name}.{ext}`, or kohya's `last.{ext}`.
    pub fn final_model_path(&self) -> PathBuf {
        self.path(&crate::state::last_file_name(self.name.as_deref(), self.ext()))
    }

    /// The stem of the run's logs: `{output_name}.jsonl`, `{output_name}.validation.jsonl`.
    pub fn log_stem(&self) -> &str {
        self.name.as_deref().unwrap_or("train")
    }

    /// The file extension with its dot (empty for Diffusers folders), as kohya's names take it.
    pub fn ext(&self) -> &'static str {
        self.format.extension()
    }
}

pub fn cwd() -> Result<PathBuf> {
    std::env::current_dir().map_err(|e| TrainError::io(".", e))
}

pub fn datasets(plan: &TrainPlan) -> Result<DatasetGroup> {
    Ok(sdbooth_data::prepare_datasets(plan.data.config.as_deref(), &plan.data.options, &cwd()?)?)
}
