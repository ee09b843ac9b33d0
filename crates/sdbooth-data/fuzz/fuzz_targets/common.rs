//! What the data fuzz targets share: a scratch folder per process with two small valid images,
//! and a reader of option values from the fuzz input's first bytes.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// `<tmp>/sdbooth-data-fuzz-<pid>/` holding `img/a.png` (8×8) and `img/b.png` (16×8).
pub fn scratch() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("sdbooth-data-fuzz-{}", std::process::id()));
        let img = dir.join("img");
        std::fs::create_dir_all(&img).expect("scratch folder");
        let a = image_png(8, 8);
        std::fs::write(img.join("a.png"), a).expect("a.png");
        std::fs::write(img.join("b.png"), image_png(16, 8)).expect("b.png");
        dir
    })
}

fn image_png(w: u32, h: u32) -> Vec<u8> {
    // A valid RGB PNG, written once; the sdbooth-data crate decodes it on every run.
    let img = image_rgb(w, h);
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).expect("png");
    out.into_inner()
}

fn image_rgb(w: u32, h: u32) -> image::RgbImage {
    image::RgbImage::from_fn(w, h, |x, y| image::Rgb([(x * 20) as u8, (y * 30) as u8, 99]))
}

/// Reads small values off the front of the input; the rest is the payload.
pub struct Knobs<'a> {
    pub bytes: &'a [u8],
}

impl<'a> Knobs<'a> {
    pub fn u8(&mut self) -> u8 {
        match self.bytes.split_first() {
            Some((b, rest)) => {
                self.bytes = rest;
                *b
            }
            None => 0,
        }
    }
    pub fn bool(&mut self) -> bool {
        self.u8() & 1 == 1
    }
    /// A rate that is usually in [0, 1] but sometimes out of range or NaN.
    pub fn rate(&mut self) -> f64 {
        match self.u8() {
            255 => f64::NAN,
            254 => f64::INFINITY,
            v => v as f64 / 200.0,
        }
    }
    /// A size in steps of 8, 0 included.
    pub fn size(&mut self) -> u32 {
        self.u8() as u32 * 8
    }
    pub fn rest(self) -> &'a [u8] {
        self.bytes
    }
}
