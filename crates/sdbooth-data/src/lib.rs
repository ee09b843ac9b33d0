//! The CPU-side data path of DreamBooth training, with kohya's semantics: dataset TOML and legacy
//! folders, captions, the CLIP tokenizer, image checks, buckets, augmentation and batches.

pub mod tokenizer;
