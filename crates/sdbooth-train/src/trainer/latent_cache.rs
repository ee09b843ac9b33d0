//! `--cache_latents` (in memory) and `--cache_latents_to_disk` (an
//! `<image>.sdbooth-latents.safetensors` file beside each image, where kohya keeps an `.npz`).
//!
//! Each image's latent is one sample of the VAE posterior, drawn with noise from a stream named
//! by the run's seed and the image's path, so the cached latent does not depend on the order of
//! encoding or on whether it came from memory or disk. A disk entry is reused only when its key
//! matches: the image file (size and modification time), its bucket, resize and crop, the VAE
//! weights and the seed; `--skip_cache_check` trusts any entry of the right shape, as kohya.
//! Either way the latent bytes must match the checksum stored beside them: a corrupted file is
//! encoded again (with a warning naming it), never trained on.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use sdbooth_data::{DatasetGroup, SampleContext, Streams};
use sdbooth_models::{ParamStore, Vae};

use super::step::normal_tensor;
use crate::error::{Result, TrainError};

/// Latents keyed by (dataset, image).
pub type LatentCache = HashMap<(usize, usize), Tensor>;

const KEY: &str = "sdbooth.latent_key";
/// FNV-1a 64 of the latent tensor's bytes, hex.
const CHECKSUM: &str = "sdbooth.latent_fnv64";
const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

pub struct CacheSettings {
    /// Where the latents are computed and kept (files are read and written on the host).
    pub device: Device,
    pub seed: u64,
    pub to_disk: bool,
    pub skip_cache_check: bool,
    pub vae_batch_size: usize,
}

fn fnv(bytes: &[u8], mut h: u64) -> u64 {
    for b in bytes {
        h ^= *b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// A fingerprint of the VAE weights: every tensor's name and sum of absolute values.
pub fn vae_fingerprint(params: &ParamStore) -> Result<String> {
    let mut h = FNV_OFFSET;
    for (name, var) in params.iter() {
        let s = var.as_tensor().abs()?.sum_all()?.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?;
        h = fnv(name.as_bytes(), h);
        h = fnv(&s.to_le_bytes(), h);
    }
    Ok(format!("{h:016x}"))
}

fn cache_path(image: &Path) -> PathBuf {
    let mut name = image.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(".sdbooth-latents.safetensors");
    image.with_file_name(name)
}

fn image_key(group: &DatasetGroup, di: usize, ii: usize, vae: &str, seed: u64) -> Result<String> {
    let entry = &group.datasets[di].images[ii];
    let meta = std::fs::metadata(&entry.path).map_err(|e| TrainError::io(&entry.path, e))?;
    let mtime =
        meta.modified().ok().and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok()).map(|d| d.as_nanos());
    Ok(format!(
        "v2 size={} mtime={:?} bucket={:?} resized={:?} vae={vae} seed={seed}",
        meta.len(),
        mtime,
        entry.bucket,
        entry.resized_size
    ))
}

fn checksum(payload: &[u8]) -> String {
    format!("{:016x}", fnv(payload, FNV_OFFSET))
}

fn read_cached(path: &Path, key: &str, shape: &[usize], trust: bool) -> Option<Tensor> {
    let bytes = std::fs::read(path).ok()?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).ok()?;
    let meta = meta.metadata().clone().unwrap_or_default();
    if !trust && meta.get(KEY).map(String::as_str) != Some(key) {
        return None;
    }
    let file = safetensors::SafeTensors::deserialize(&bytes).ok()?;
    let payload = file.tensor("latents").ok()?;
    if meta.get(CHECKSUM) != Some(&checksum(payload.data())) {
        tracing::warn!("latent cache {}: checksum mismatch (damaged file); encoding again", path.display());
        return None;
    }
    let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu).ok()?;
    let t = tensors.get("latents")?.clone();
    (t.dims() == shape).then_some(t)
}

fn write_cached(path: &Path, key: &str, latents: &Tensor) -> Result<()> {
    let data: Vec<f32> = latents.flatten_all()?.to_vec1()?;
    let bytes: Vec<u8> = data.iter().flat_map(|v| v.to_le_bytes()).collect();
    let encode_error = |e: safetensors::SafeTensorError| TrainError::io(path, std::io::Error::other(e));
    let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, latents.dims().to_vec(), &bytes)
        .map_err(encode_error)?;
    let meta = std::collections::HashMap::from([
        (KEY.to_string(), key.to_string()),
        (CHECKSUM.to_string(), checksum(&bytes)),
    ]);
    let out = safetensors::serialize([("latents", view)], &Some(meta)).map_err(encode_error)?;
    sdbooth_checkpoint::atomic_write_bytes(path, &out).map_err(|e| TrainError::io(path, e))
}

/// Encodes (or reads back) every image's latent.
pub fn build(
    group: &DatasetGroup,
    vae: &Vae,
    vae_params: &ParamStore,
    settings: &CacheSettings,
    ctx: &SampleContext,
    bar: &indicatif::ProgressBar,
) -> Result<LatentCache> {
    let device = &settings.device;
    let fingerprint = if settings.to_disk { vae_fingerprint(vae_params)? } else { String::new() };
    let f = vae.downscale_factor();
    let mut cache = LatentCache::new();
    let mut reused = 0usize;
    for (di, ds) in group.datasets.iter().enumerate() {
        // Images of one bucket encode together, `--vae_batch_size` at a time.
        for bucket in &ds.buckets {
            let mut todo: Vec<usize> = bucket.items.clone();
            todo.sort_unstable();
            todo.dedup();
            let mut pending = Vec::new();
            for &ii in &todo {
                let (w, h) = ds.images[ii].bucket;
                let shape = [1, 4, h as usize / f, w as usize / f];
                if settings.to_disk {
                    let key = image_key(group, di, ii, &fingerprint, settings.seed)?;
                    let path = cache_path(&ds.images[ii].path);
                    if let Some(t) = read_cached(&path, &key, &shape, settings.skip_cache_check) {
                        cache.insert((di, ii), t.to_device(device)?);
                        reused += 1;
                        bar.inc(1);
                        continue;
                    }
                }
                pending.push(ii);
            }
            for chunk in pending.chunks(settings.vae_batch_size.max(1)) {
                let mut images = Vec::with_capacity(chunk.len());
                let mut noises = Vec::with_capacity(chunk.len());
                for &ii in chunk {
                    let sample = sdbooth_data::load_sample(group, di, ii, 0, ctx)?;
                    let (h, w) = (sample.height as usize, sample.width as usize);
                    images.push(Tensor::from_vec(sample.pixels, (1, 3, h, w), device)?);
                    let mut rng = Streams::new(settings.seed).cached_latent(&ds.images[ii].path);
                    noises.push(normal_tensor(&mut rng, &[1, 4, h / f, w / f], device)?);
                }
                let latents = vae.encode_to_latents(
                    vae_params,
                    &Tensor::cat(&images, 0)?,
                    &Tensor::cat(&noises, 0)?,
                    None,
                )?;
                for (k, &ii) in chunk.iter().enumerate() {
                    let latent = latents.narrow(0, k, 1)?.contiguous()?;
                    if settings.to_disk {
                        let key = image_key(group, di, ii, &fingerprint, settings.seed)?;
                        write_cached(&cache_path(&ds.images[ii].path), &key, &latent)?;
                    }
                    cache.insert((di, ii), latent);
                    bar.inc(1);
                }
            }
        }
    }
    if settings.to_disk {
        tracing::info!("latents: {reused} read from disk caches, {} encoded", cache.len() - reused);
    }
    Ok(cache)
}
