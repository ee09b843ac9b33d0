//! Where a run computes: the ONE place that turns `--device` into a `candle_core::Device`.
//!
//! Everything a step touches (weights, cached latents, the VAE, the text encoder, noise, masks,
//! optimizer state) is created on, or moved to, the device resolved here, which the plan
//! ([`crate::plan::TrainPlan::device`]) carries. Code elsewhere names `Device::Cpu` only for what
//! must be on the host: reading and writing files.
//!
//! `--device auto|cpu|cuda|cuda:N` on `train`, `bench`, `generate` and `selftest`:
//! - `cpu`: the CPU.
//! - `cuda` / `cuda:N`: that GPU (`cuda` is `cuda:0`), or an error saying why not: no CUDA in this
//!   build, no NVIDIA driver, a missing CUDA library, no such GPU.
//! - `auto` (the default): the first GPU when this binary has CUDA and one is usable, else the CPU
//!   (with a one-line note saying why, on a CUDA build).
//!
//! A CUDA build starts on machines without the driver: its CUDA libraries are loaded on first use
//! (tools/cuda/setup.sh), so before any CUDA call [`probe_cuda`] checks with `dlopen` that every
//! library is there and names the first one missing.

use std::fmt;
use std::str::FromStr;

use candle_core::Device;
use serde::{Deserialize, Serialize};

use crate::error::{Result, TrainError};

/// The value of `--device`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum DeviceChoice {
    #[default]
    Auto,
    Cpu,
    /// A GPU by ordinal (`cuda` is 0).
    Cuda(usize),
}

impl FromStr for DeviceChoice {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(DeviceChoice::Auto),
            "cpu" => Ok(DeviceChoice::Cpu),
            "cuda" => Ok(DeviceChoice::Cuda(0)),
            other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(n)) => Ok(DeviceChoice::Cuda(n)),
                _ => Err(format!("unknown device {s:?}: use auto, cpu, cuda or cuda:N (N = 0, 1, ...)")),
            },
        }
    }
}

impl fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceChoice::Auto => f.write_str("auto"),
            DeviceChoice::Cpu => f.write_str("cpu"),
            DeviceChoice::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl TryFrom<String> for DeviceChoice {
    type Error = String;
    fn try_from(s: String) -> std::result::Result<Self, String> {
        s.parse()
    }
}

impl From<DeviceChoice> for String {
    fn from(c: DeviceChoice) -> String {
        c.to_string()
    }
}

/// The device a run got, and what to print about it.
#[derive(Debug, Clone)]
pub struct SelectedDevice {
    pub device: Device,
    /// One line for the start of a run: "cuda:0 (NVIDIA H200, 139.8 GiB)" or "CPU (2 threads)".
    pub description: String,
    /// Why `auto` fell back to the CPU on a CUDA build (printed as a note).
    pub fallback_note: Option<String>,
}

/// Whether this binary was built with CUDA (`--features cuda` or `cudnn`).
pub const fn built_with_cuda() -> bool {
    cfg!(feature = "cuda")
}

/// Resolves `--device` and `--allow_tf32`. The errors: an explicit `cuda`/`cuda:N` that cannot
/// be had, and `--allow_tf32` on a run that ends up on the CPU (where TF32 does not exist, so the
/// flag would be ignored).
///
/// TF32 (`--allow_tf32`, sdbooth's own flag, PyTorch's `allow_tf32`): f32 matrix products and
/// convolutions on an NVIDIA GPU (Ampere or newer) may round their inputs to TF32 (10-bit
/// mantissa, f32 accumulation). Off by default, as in PyTorch and candle: f32 stays f32. Without
/// the flag a CUDA run also keeps cuDNN's f32 convolutions off TF32 (which cuDNN's default math
/// would otherwise allow) through `NVIDIA_TF32_OVERRIDE=0`.
pub fn select(choice: DeviceChoice, allow_tf32: bool) -> Result<SelectedDevice> {
    let selected = select_device(choice, allow_tf32)?;
    if allow_tf32 && selected.device.is_cpu() {
        let why = selected.fallback_note.as_deref().map(|n| format!(" ({n})")).unwrap_or_default();
        return Err(TrainError::Config(format!(
            "--allow_tf32: TF32 is a mode of NVIDIA GPUs, and this run is on the CPU{why}, where \
             the flag would have no effect; drop it, or run on a GPU (--device cuda)"
        )));
    }
    Ok(selected)
}

fn select_device(choice: DeviceChoice, allow_tf32: bool) -> Result<SelectedDevice> {
    match choice {
        DeviceChoice::Cpu => Ok(cpu(None)),
        DeviceChoice::Auto if !built_with_cuda() => Ok(cpu(None)),
        DeviceChoice::Auto => match probe_cuda(0, allow_tf32) {
            Ok(gpu) => Ok(gpu),
            Err(reason) => Ok(cpu(Some(format!("no usable GPU ({reason}); running on the CPU")))),
        },
        DeviceChoice::Cuda(_) if !built_with_cuda() => Err(TrainError::Device {
            choice: choice.to_string(),
            reason: "this sdbooth binary was built without CUDA; build it with `--features cudnn` \
                     (README: \"GPU (CUDA)\") or use --device cpu"
                .into(),
        }),
        DeviceChoice::Cuda(n) => probe_cuda(n, allow_tf32)
            .map_err(|reason| TrainError::Device { choice: choice.to_string(), reason }),
    }
}

/// The device of a run: resolves `--device` (and `--allow_tf32`, see [`select`]) and logs the
/// choice (and why `auto` fell back to the CPU) at the start of the run.
pub fn resolve_device(choice: DeviceChoice, allow_tf32: bool) -> Result<Device> {
    let selected = select(choice, allow_tf32)?;
    if let Some(note) = &selected.fallback_note {
        tracing::info!("note: {note}");
    }
    tracing::info!("device: {}", selected.description);
    Ok(selected.device)
}

fn cpu(fallback_note: Option<String>) -> SelectedDevice {
    let threads = rayon::current_num_threads();
    let cuda = if built_with_cuda() { "" } else { ", built without CUDA" };
    SelectedDevice {
        device: Device::Cpu,
        description: format!("CPU ({threads} threads{cuda})"),
        fallback_note,
    }
}

/// Without CUDA in the build, no GPU can be probed.
#[cfg(not(feature = "cuda"))]
fn probe_cuda(_ordinal: usize, _allow_tf32: bool) -> std::result::Result<SelectedDevice, String> {
    Err("this binary was built without CUDA".into())
}

#[cfg(feature = "cuda")]
fn probe_cuda(ordinal: usize, allow_tf32: bool) -> std::result::Result<SelectedDevice, String> {
    cuda::set_tf32(allow_tf32);
    cuda::probe(ordinal)
}

#[cfg(feature = "cuda")]
mod cuda {
    //! Checks for the driver, the libraries and the GPU, in that order, so that the error names
    //! the first thing missing.

    use std::ffi::{CStr, CString};

    use candle_core::Device;
    use cudarc::driver::{result, sys};

    use super::SelectedDevice;

    /// The NVIDIA driver's library (comes with the driver, R580+ for CUDA 13).
    const DRIVER: &str = "libcuda.so.1";
    /// The CUDA 13 libraries candle uses (PyPI: nvidia-cuda-runtime, nvidia-cublas,
    /// nvidia-curand, nvidia-cuda-nvrtc, nvidia-cudnn-cu13), loaded on first use.
    fn libraries() -> Vec<&'static str> {
        let mut libs = vec![
            "libcudart.so.13",
            "libcublas.so.13",
            "libcublasLt.so.13",
            "libcurand.so.10",
            "libnvrtc.so.13",
        ];
        if cfg!(feature = "cudnn") {
            libs.push("libcudnn.so.9");
        }
        libs
    }

    /// Whether f32 matrix products and convolutions may use TF32 (`--allow_tf32`), set before
    /// any CUDA library is loaded: candle's cuBLAS f32 GEMMs take it from its switch (off by
    /// default); cuDNN's default math allows TF32 for f32 convolutions on Ampere and newer, which
    /// the driver's documented `NVIDIA_TF32_OVERRIDE=0` turns off in every CUDA library. A value
    /// the user set is kept.
    pub(super) fn set_tf32(allow: bool) {
        candle_core::cuda_backend::set_gemm_reduced_precision_f32(allow);
        if !allow && std::env::var_os("NVIDIA_TF32_OVERRIDE").is_none() {
            // Called while resolving --device, before any CUDA library is loaded and before the
            // run starts its own threads.
            std::env::set_var("NVIDIA_TF32_OVERRIDE", "0");
        }
    }

    /// Whether `dlopen` finds `name`; the handle stays open (the lazy stubs reuse the library).
    fn can_load(name: &str) -> std::result::Result<(), String> {
        let c = CString::new(name).map_err(|e| e.to_string())?;
        // SAFETY: dlopen with a valid C string; RTLD_NOW loads the library's own dependencies.
        let handle = unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
        if handle.is_null() {
            // SAFETY: dlerror returns a thread-local C string or null.
            let err = unsafe { libc::dlerror() };
            let detail = if err.is_null() {
                String::from("not found")
            } else {
                // SAFETY: non-null, NUL-terminated, valid until the next dl* call on this thread.
                unsafe { CStr::from_ptr(err) }.to_string_lossy().into_owned()
            };
            return Err(detail);
        }
        Ok(())
    }

    fn driver_version() -> Option<i32> {
        let mut v = 0i32;
        // SAFETY: cuDriverGetVersion writes one int; it needs no cuInit.
        let status = unsafe { sys::cuDriverGetVersion(&mut v) };
        (status == sys::CUresult::CUDA_SUCCESS).then_some(v)
    }

    pub(super) fn probe(ordinal: usize) -> std::result::Result<SelectedDevice, String> {
        can_load(DRIVER).map_err(|e| {
            format!("no NVIDIA driver: {DRIVER} cannot be loaded ({e}); CUDA 13 needs driver R580 or newer")
        })?;
        if let Some(v) = driver_version() {
            if v < 13000 {
                return Err(format!(
                    "the NVIDIA driver supports CUDA {}.{}; this build needs CUDA 13 (driver R580 or newer)",
                    v / 1000,
                    (v % 1000) / 10
                ));
            }
        }
        for lib in libraries() {
            can_load(lib).map_err(|e| {
                format!(
                    "{lib} cannot be loaded ({e}); install the CUDA 13 libraries (README: \"GPU \
                     (CUDA)\") and add their folder to LD_LIBRARY_PATH"
                )
            })?;
        }
        result::init().map_err(|e| format!("the NVIDIA driver found no usable GPU (cuInit: {e})"))?;
        let count = result::device::get_count().map_err(|e| format!("cannot count GPUs: {e}"))?;
        let count = usize::try_from(count).unwrap_or(0);
        if count == 0 {
            return Err("the NVIDIA driver is installed but reports no GPU".into());
        }
        if ordinal >= count {
            return Err(format!(
                "there is no GPU {ordinal}: this machine has {count} (cuda:0 to cuda:{})",
                count - 1
            ));
        }
        let index = i32::try_from(ordinal).map_err(|_| format!("GPU ordinal {ordinal} is too large"))?;
        let dev = result::device::get(index).map_err(|e| format!("GPU {ordinal}: {e}"))?;
        let name = result::device::get_name(dev).unwrap_or_else(|_| "unknown GPU".into());
        // SAFETY: `dev` came from cuDeviceGet above.
        let total = unsafe { result::device::total_mem(dev) }.unwrap_or(0);
        let device =
            Device::new_cuda(ordinal).map_err(|e| format!("cannot start CUDA on GPU {ordinal}: {e}"))?;
        let description = format!("cuda:{ordinal} ({name}, {:.1} GiB)", total as f64 / (1u64 << 30) as f64);
        Ok(SelectedDevice { device, description, fallback_note: None })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_form_and_rejects_others() {
        assert_eq!("auto".parse(), Ok(DeviceChoice::Auto));
        assert_eq!("CPU".parse(), Ok(DeviceChoice::Cpu));
        assert_eq!("cuda".parse(), Ok(DeviceChoice::Cuda(0)));
        assert_eq!("cuda:3".parse(), Ok(DeviceChoice::Cuda(3)));
        for bad in ["", "cuda:", "cuda:x", "metal", "cuda:-1"] {
            let err = bad.parse::<DeviceChoice>().err();
            assert!(
                err.as_deref().is_some_and(|e| e.contains("auto, cpu, cuda or cuda:N")),
                "{bad:?}: {err:?}"
            );
        }
        for c in [DeviceChoice::Auto, DeviceChoice::Cpu, DeviceChoice::Cuda(2)] {
            assert_eq!(c.to_string().parse(), Ok(c));
        }
    }

    #[test]
    fn cpu_is_always_available() {
        let s = select(DeviceChoice::Cpu, false).map_err(|e| e.to_string());
        assert!(s.as_ref().is_ok_and(|s| s.device.is_cpu() && s.fallback_note.is_none()), "{s:?}");
    }

    /// On a machine without a GPU (CI): `auto` is the CPU, with a note on a CUDA build; an
    /// explicit `cuda` is an error that says why. (Skipped where a GPU is usable.)
    #[test]
    fn auto_falls_back_and_cuda_fails_clearly_without_a_gpu() {
        if probe_cuda(0, false).is_ok() {
            return;
        }
        let auto = select(DeviceChoice::Auto, false).map_err(|e| e.to_string());
        assert!(auto.as_ref().is_ok_and(|s| s.device.is_cpu()), "{auto:?}");
        if let Ok(s) = &auto {
            assert_eq!(s.fallback_note.is_some(), built_with_cuda(), "{s:?}");
        }
        let err = select(DeviceChoice::Cuda(0), false).err().map(|e| e.to_string()).unwrap_or_default();
        let expected = if built_with_cuda() { "driver" } else { "built without CUDA" };
        assert!(err.contains("--device cuda:0") && err.contains(expected), "{err}");
        // --allow_tf32 would be ignored on the CPU: refused, naming the flag.
        for choice in [DeviceChoice::Auto, DeviceChoice::Cpu] {
            let err = select(choice, true).err().map(|e| e.to_string()).unwrap_or_default();
            assert!(err.contains("--allow_tf32: TF32 is a mode of NVIDIA GPUs"), "{choice}: {err}");
        }
    }
}
