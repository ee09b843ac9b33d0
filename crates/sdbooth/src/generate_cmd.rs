//! `sdbooth generate`: images from a model file, with kohya's prompt-file options.

use std::path::PathBuf;

use anyhow::{bail, Context};
use candle_core::DType;
use sdbooth_checkpoint::{load_model, LoadOptions};
use sdbooth_data::tokenizer::ClipTokenizer;
use sdbooth_models::ddpm::DdpmSchedule;
use sdbooth_models::vae::check_image_size_before_loading;
use sdbooth_models::ParamStore;
use sdbooth_sample::generate::{write_png, Pipeline, Request};
use sdbooth_sample::prompts::{check_prompt_sizes, read_prompt_file, PromptSpec};
use sdbooth_train::device::DeviceChoice;

#[derive(clap::Args)]
#[command(rename_all = "snake_case")]
pub struct GenerateArgs {
    /// Model: SD .safetensors/.ckpt, Diffusers folder, HF id in the local cache, or builtin:NAME.
    #[arg(long, value_name = "MODEL")]
    pub ckpt: String,
    /// The prompt (or use --from_file).
    #[arg(long)]
    pub prompt: Option<String>,
    /// Prompts, one a line, with kohya's options --n --w --h --d --l --s (.txt, .toml or .json).
    #[arg(long, value_name = "FILE")]
    pub from_file: Option<PathBuf>,
    #[arg(long, default_value = "")]
    pub negative_prompt: String,
    /// Sampling steps.
    #[arg(long, default_value_t = 30)]
    pub steps: usize,
    /// Classifier-free guidance scale.
    #[arg(long, default_value_t = 7.5)]
    pub scale: f64,
    /// Seed of the first image; each further image of a prompt adds 1.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Width in pixels (a multiple of 8).
    #[arg(long = "W", default_value_t = 512)]
    pub width: usize,
    /// Height in pixels (a multiple of 8).
    #[arg(long = "H", default_value_t = 512)]
    pub height: usize,
    #[arg(long, default_value_t = 1)]
    pub images_per_prompt: usize,
    /// kohya's sampler names: ddim, pndm, lms, euler, euler_a, heun, dpm_2, dpm_2_a, dpmsolver,
    /// dpmsolver++, dpmsingle, and the k_ aliases.
    #[arg(long, default_value = "ddim")]
    pub sampler: String,
    /// Where the PNGs go.
    #[arg(long, value_name = "DIR")]
    pub outdir: PathBuf,
    /// SD 2.x model (checked against the file).
    #[arg(long)]
    pub v2: bool,
    /// v-prediction model (when the file does not say).
    #[arg(long)]
    pub v_parameterization: bool,
    /// Use the text encoder's n-th layer from the end.
    #[arg(long)]
    pub clip_skip: Option<usize>,
    /// Prompt length in tokens: 75 (default), 150 or 225, as in training.
    #[arg(long)]
    pub max_token_length: Option<usize>,
    /// A separate VAE file.
    #[arg(long, value_name = "FILE")]
    pub vae: Option<PathBuf>,
    /// Where to compute: auto (the first GPU when this binary has CUDA and one is usable, else
    /// the CPU), cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto", value_name = "DEVICE")]
    pub device: DeviceChoice,
}

/// Loaded tensors as f32 parameters on `device`.
fn store(
    map: &std::collections::BTreeMap<String, candle_core::Tensor>,
    device: &candle_core::Device,
) -> anyhow::Result<ParamStore> {
    let mut out = std::collections::BTreeMap::new();
    for (k, t) in map {
        out.insert(k.clone(), t.to_dtype(DType::F32)?.to_device(device)?);
    }
    Ok(ParamStore::from_tensors(out)?)
}

pub fn run(args: GenerateArgs) -> anyhow::Result<()> {
    let specs: Vec<PromptSpec> = match (&args.prompt, &args.from_file) {
        (Some(p), None) => vec![PromptSpec { prompt: p.clone(), ..Default::default() }],
        (None, Some(f)) => read_prompt_file(f).map_err(anyhow::Error::msg)?,
        (Some(_), Some(_)) => bail!("give either --prompt or --from_file, not both"),
        (None, None) => bail!("nothing to generate: give --prompt or --from_file"),
    };
    if let Some(n) = args.max_token_length.filter(|n| ![75, 150, 225].contains(n)) {
        bail!("--max_token_length {n}: choose 75, 150 or 225");
    }
    // Refusals that need no model: a command that would exit 0 having done nothing, or NaN images.
    if args.images_per_prompt == 0 {
        bail!("--images_per_prompt 0 generates nothing; give 1 or more");
    }
    if specs.is_empty() {
        let file = args.from_file.as_ref().map(|f| f.display().to_string()).unwrap_or_default();
        bail!("{file}: no prompt in the file (it is empty or holds only comments)");
    }
    if !args.scale.is_finite() {
        bail!("--scale {}: must be a finite number", args.scale);
    }
    if let Some((i, s)) = specs.iter().enumerate().find(|(_, s)| s.scale.is_some_and(|l| !l.is_finite())) {
        bail!("prompt {} ({:?}): the scale (--l) must be a finite number", i + 1, s.prompt);
    }
    // Sizes no model could make, refused before the model is loaded.
    check_image_size_before_loading(args.width, args.height)
        .map_err(|e| anyhow::anyhow!("--W {} --H {}: {e}", args.width, args.height))?;
    if let Some(file) = &args.from_file {
        check_prompt_sizes(file, &specs, (args.width, args.height)).map_err(anyhow::Error::msg)?;
    }
    let opts = LoadOptions {
        v2: args.v2.then_some(true),
        v_parameterization: args.v_parameterization,
        vae: args.vae.clone(),
        dtype: None,
    };
    let device = crate::select_device(args.device)?;
    let model = load_model(&args.ckpt, &opts).with_context(|| format!("loading {}", args.ckpt))?;
    let (unet, te, vae) =
        (store(&model.unet, &device)?, store(&model.text_encoder, &device)?, store(&model.vae, &device)?);
    let tokenizer = if model.config.v2 { ClipTokenizer::sd2()? } else { ClipTokenizer::sd1()? };
    let pipeline = Pipeline {
        config: &model.config,
        unet: &unet,
        text_encoder: &te,
        vae: &vae,
        tokenizer: &tokenizer,
        v_prediction: model.v_parameterization,
        schedule: &DdpmSchedule::sd(),
        clip_skip: args.clip_skip,
        max_token_length: args.max_token_length.filter(|&n| n != 75),
        dtype: None,
        device: &device,
    };
    let model_name = std::path::Path::new(&args.ckpt)
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| args.ckpt.clone());
    std::fs::create_dir_all(&args.outdir).with_context(|| format!("creating {}", args.outdir.display()))?;
    let defaults = Request {
        prompt: String::new(),
        negative_prompt: args.negative_prompt.clone(),
        width: args.width,
        height: args.height,
        steps: args.steps,
        scale: args.scale,
        seed: args.seed,
        sampler: args.sampler.clone(),
    };
    let mut index = 0;
    for spec in &specs {
        let base = Request::from_spec(spec, &defaults);
        for k in 0..args.images_per_prompt {
            let req = Request { seed: base.seed.wrapping_add(k as u64), ..base.clone() };
            let rgb = pipeline.generate(&req)?;
            // Names depend only on the request, so the same command writes the same files.
            let path = args.outdir.join(format!("{index:05}-{}.png", req.seed));
            write_png(&path, req.width, req.height, &rgb, &req.a1111_parameters(&model_name))?;
            println!("{}", path.display());
            index += 1;
        }
    }
    Ok(())
}
