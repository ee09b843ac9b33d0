//! sdbooth-checkpoint: Stable Diffusion 1.x/2.x checkpoints in and out.
//!
//! - SD single files: `.safetensors` (own header parser, tensors read straight into place) and
//!   `.ckpt` (PyTorch zip + pickle, read by a data-only pickle machine that refuses any global
//!   beyond the tensor-rebuild ones).
//! - Diffusers folders, HF ids in the local cache, `builtin:*` random models, `--vae` files.
//! - Saving as kohya's train_db does (source keys kept, SD2 filler keys, modelspec metadata), with
//!   every file written atomically ([`atomic_write`]).
//!
//! Inside, parameters have diffusers' names; [`KeyMap`] maps them to SD's.

pub mod atomic;
pub mod ckpt_pickle;
pub mod config_io;
pub mod diffusers;
pub mod dtype;
pub mod error;
pub mod hf_cache;
pub mod inspect;
pub mod keymap;
pub mod keymap_clip;
pub mod keymap_unet;
pub mod keymap_vae;
pub mod model;
pub mod pickle;
pub mod safetensors_io;
pub mod save;
pub mod single_file;
pub mod tensor_file;
pub mod time;
pub mod tokenizer_files;
pub mod vae_file;

pub use atomic::{atomic_write, atomic_write_bytes, atomic_write_file};
pub use dtype::Dtype;
pub use error::{CheckpointError, Result};
pub use inspect::{inspect, Inspection};
pub use keymap::{KeyMap, Part};
pub use model::{load_model, LoadOptions, LoadedModel, ModelParts, SourceInfo, SourceKind, TensorMap};
pub use save::{modelspec_metadata, save_model, ModelSpecArgs, SaveFormat, SaveOptions, SaveReport};
pub use single_file::Precision;
pub use tensor_file::TensorIndex;
