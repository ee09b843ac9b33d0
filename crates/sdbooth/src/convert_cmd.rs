//! `sdbooth convert IN OUT`: any model spec `--pretrained_model_name_or_path` takes, to an SD
//! single file (.safetensors / .ckpt) or a Diffusers folder (owned by the checkpoint work, issue 4).

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use anyhow::{bail, Context};
use sdbooth_checkpoint::{
    load_model, modelspec_metadata, save_model, LoadOptions, ModelSpecArgs, Precision, SaveFormat,
    SaveOptions, SourceKind,
};

#[derive(clap::Args)]
pub struct ConvertArgs {
    /// Input: SD .safetensors/.ckpt, Diffusers folder, HF id in the local cache, or builtin:NAME.
    pub input: String,
    /// Output file (.safetensors, .ckpt) or folder (Diffusers).
    pub output: PathBuf,
    /// ckpt | safetensors | diffusers | diffusers_safetensors (default: from OUT's extension).
    #[arg(long = "save_model_as")]
    pub save_model_as: Option<String>,
    /// fp16 | bf16 | float (default: keep each tensor's dtype).
    #[arg(long = "save_precision")]
    pub save_precision: Option<String>,
    /// Check the input is SD 2.x (it is detected either way).
    #[arg(long = "v2")]
    pub v2: bool,
    /// The model predicts v (used when the input does not record it).
    #[arg(long = "v_parameterization")]
    pub v_parameterization: bool,
    /// Replace the VAE with this file or folder.
    #[arg(long = "vae")]
    pub vae: Option<PathBuf>,
    /// Replace OUT when it exists (a file, or a Diffusers folder); without it an existing OUT is
    /// refused.
    #[arg(long = "overwrite")]
    pub overwrite: bool,
    /// Do not write the v2-inference.yaml beside SD2 single files.
    #[arg(long = "no_yaml")]
    pub no_yaml: bool,
    /// modelspec.title (default: OUT's file name).
    #[arg(long = "metadata_title")]
    pub metadata_title: Option<String>,
    #[arg(long = "metadata_author")]
    pub metadata_author: Option<String>,
    #[arg(long = "metadata_description")]
    pub metadata_description: Option<String>,
    #[arg(long = "metadata_license")]
    pub metadata_license: Option<String>,
    #[arg(long = "metadata_tags")]
    pub metadata_tags: Option<String>,
}

pub fn run(args: ConvertArgs) -> anyhow::Result<()> {
    let format = match &args.save_model_as {
        Some(s) => SaveFormat::parse(s).with_context(|| {
            format!("--save_model_as {s}: expected ckpt, safetensors, diffusers or diffusers_safetensors")
        })?,
        None => SaveFormat::from_path(&args.output),
    };
    let precision = match &args.save_precision {
        Some(s) => Some(
            Precision::parse(s)
                .with_context(|| format!("--save_precision {s}: expected fp16, bf16 or float"))?,
        ),
        None => None,
    };
    check_output(&args.output, format, args.overwrite)?;
    let opts = LoadOptions {
        v2: if args.v2 { Some(true) } else { None },
        v_parameterization: args.v_parameterization,
        vae: args.vae.clone(),
        dtype: None,
    };
    let model = load_model(&args.input, &opts).with_context(|| format!("loading {}", args.input))?;
    for n in &model.source.notes {
        eprintln!("note: {n}");
    }
    // A single-file source's metadata travels with it; otherwise write modelspec as kohya does.
    let metadata = if model.source.kind == SourceKind::SingleSafetensors && !model.source.metadata.is_empty()
    {
        model.source.metadata.clone()
    } else {
        let stem = args.output.file_stem().map(|s| s.to_string_lossy().into_owned());
        let spec = ModelSpecArgs {
            title: args.metadata_title.clone(),
            output_name: stem,
            author: args.metadata_author.clone(),
            description: args.metadata_description.clone(),
            license: args.metadata_license.clone(),
            tags: args.metadata_tags.clone(),
            ..Default::default()
        };
        let mut m = modelspec_metadata(&model.config, model.v_parameterization, &spec, SystemTime::now());
        m.insert("sdbooth.converted_from".into(), published_source_name(&args.input));
        m
    };
    let mut save = SaveOptions::new(format);
    save.precision = precision;
    save.source = Some(&model.source);
    save.metadata = metadata;
    save.v_parameterization = model.v_parameterization;
    save.sd2_yaml = !args.no_yaml;
    let report = save_model(&args.output, &model.parts(), &model.config, &save)
        .with_context(|| format!("writing {}", args.output.display()))?;
    eprintln!(
        "converted {} ({}, {}) -> {} tensors in {}",
        args.input,
        model.config.name,
        if model.v_parameterization { "v-prediction" } else { "epsilon" },
        report.tensors,
        report.files.iter().map(|f| f.display().to_string()).collect::<Vec<_>>().join(", ")
    );
    Ok(())
}

/// The source as recorded in the output's metadata: a local file or folder by its name only (users
/// publish converted models; the absolute path would tell where their files live), anything else
/// (a builtin, a Hugging Face id) as given.
fn published_source_name(input: &str) -> String {
    let path = Path::new(input);
    match path.file_name() {
        Some(name) if path.exists() => name.to_string_lossy().into_owned(),
        _ => input.to_string(),
    }
}

/// Refuses, before anything is loaded, an OUT whose extension says another format, and an OUT
/// that exists unless `--overwrite` (and even then a folder that is not a Diffusers model).
fn check_output(out: &Path, format: SaveFormat, overwrite: bool) -> anyhow::Result<()> {
    // The extension names the format for every reader of the file; a pickle under a .safetensors
    // name (or a folder named *.ckpt) would mislead them.
    let implied = SaveFormat::from_path(out);
    let agrees = match format {
        SaveFormat::Safetensors | SaveFormat::Ckpt => implied == format,
        SaveFormat::Diffusers | SaveFormat::DiffusersSafetensors => !implied.is_single_file(),
    };
    if !agrees {
        let wanted = match format {
            SaveFormat::Safetensors => "a name ending in .safetensors",
            SaveFormat::Ckpt => "a name ending in .ckpt (or .pt, .pth)",
            _ => "a folder name without .safetensors/.ckpt",
        };
        bail!(
            "{}: the name says {implied:?} but the output format is {format:?}; give {wanted}, or drop \
             --save_model_as to take the format from the name",
            out.display()
        );
    }
    if format.is_single_file() && out.is_dir() {
        bail!("{} is a folder; a {format:?} output needs a file name", out.display());
    }
    if !out.exists() {
        return Ok(());
    }
    let is_empty_dir =
        out.is_dir() && std::fs::read_dir(out).map(|mut d| d.next().is_none()).unwrap_or(false);
    if is_empty_dir {
        return Ok(());
    }
    if !overwrite {
        bail!("{} exists; add --overwrite to replace it", out.display());
    }
    if out.is_dir() && !out.join("model_index.json").is_file() {
        bail!(
            "{} is a folder that is not a Diffusers model (no model_index.json); refusing to replace it even \
             with --overwrite",
            out.display()
        );
    }
    Ok(())
}
