//! Upfront check of every image, in parallel: each one is opened and fully decoded, so a bad
//! file is found before training instead of at step 3,000.

use std::io::Cursor;
use std::path::{Path, PathBuf};

use image::{ImageDecoder, ImageFormat, ImageReader};
use rayon::prelude::*;

/// PIL's Image.MAX_IMAGE_PIXELS: above it PIL warns; above twice it PIL refuses the image
/// (DecompressionBombError), so kohya fails on such a file mid-training.
pub const PIL_MAX_IMAGE_PIXELS: u64 = 89_478_485;

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ImageProbe {
    pub path: PathBuf,
    /// Pixel size as stored (what kohya uses: it ignores EXIF orientation).
    pub raw_size: (u32, u32),
    /// EXIF orientation other than "normal", e.g. "Rotate90".
    pub orientation: Option<String>,
    /// Size after applying the orientation (swapped for 90/270 rotations).
    pub oriented_size: (u32, u32),
    pub format: String,
    pub has_alpha: bool,
    pub warnings: Vec<String>,
}

impl ImageProbe {
    /// The size the bucket is chosen from.
    pub fn size(&self, ignore_exif_orientation: bool) -> (u32, u32) {
        if ignore_exif_orientation {
            self.raw_size
        } else {
            self.oriented_size
        }
    }
}

fn format_name(f: ImageFormat) -> String {
    format!("{f:?}").to_uppercase()
}

/// Checks one image. Err is the cause, worded for a user.
pub fn probe_image(path: &Path) -> Result<ImageProbe, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read: {e}"))?;
    if bytes.is_empty() {
        return Err("empty file (0 bytes)".into());
    }
    let format = image::guess_format(&bytes)
        .map_err(|_| "not an image (content is not PNG, JPEG, WebP, BMP, GIF or TIFF)".to_string())?;
    let mut warnings = Vec::new();
    let ext = path.extension().map(|e| e.to_string_lossy().to_lowercase()).unwrap_or_default();
    if !format.extensions_str().contains(&ext.as_str()) {
        warnings.push(format!(
            "content is {} but the name ends in .{ext} (read by content, as kohya does)",
            format_name(format)
        ));
    }
    let mut reader = ImageReader::new(Cursor::new(&bytes[..]));
    reader.set_format(format);
    let mut limits = image::Limits::default();
    // Our own pixel limit below decides on bombs; the allocation cap only guards memory.
    limits.max_alloc = Some(4 << 30);
    reader.limits(limits);
    let mut decoder = reader.into_decoder().map_err(|e| format!("corrupt image header: {e}"))?;
    let (w, h) = decoder.dimensions();
    if w == 0 || h == 0 {
        return Err(format!("zero-sized image ({w}x{h})"));
    }
    let pixels = w as u64 * h as u64;
    if pixels > 2 * PIL_MAX_IMAGE_PIXELS {
        return Err(format!(
            "decompression bomb: {w}x{h} = {pixels} pixels is over the limit of {} (PIL refuses it too)",
            2 * PIL_MAX_IMAGE_PIXELS
        ));
    }
    if pixels > PIL_MAX_IMAGE_PIXELS {
        warnings.push(format!("very large image ({w}x{h}); PIL warns above {PIL_MAX_IMAGE_PIXELS} pixels"));
    }
    let orientation = decoder.orientation().unwrap_or(image::metadata::Orientation::NoTransforms);
    let has_alpha = decoder.color_type().has_alpha();
    let img = image::DynamicImage::from_decoder(decoder).map_err(|e| format!("corrupt or truncated: {e}"))?;
    drop(img);
    if format == ImageFormat::Jpeg && !jpeg_has_eoi(&bytes) {
        return Err("truncated JPEG (no end-of-image marker after the image data)".into());
    }
    use image::metadata::Orientation as O;
    let (orientation, oriented_size) = match orientation {
        O::NoTransforms => (None, (w, h)),
        o @ (O::Rotate90 | O::Rotate270 | O::Rotate90FlipH | O::Rotate270FlipH) => {
            (Some(format!("{o:?}")), (h, w))
        }
        o => (Some(format!("{o:?}")), (w, h)),
    };
    Ok(ImageProbe {
        path: path.to_path_buf(),
        raw_size: (w, h),
        orientation,
        oriented_size,
        format: format_name(format),
        has_alpha,
        warnings,
    })
}

/// True when the JPEG has an end-of-image marker after its first top-level scan. The decoder we
/// use fills a truncated scan with grey instead of failing; PIL refuses such files.
fn jpeg_has_eoi(b: &[u8]) -> bool {
    let mut i = 2usize; // after SOI
    while i + 4 <= b.len() {
        if b[i] != 0xFF {
            return false;
        }
        let marker = b[i + 1];
        if marker == 0xFF {
            i += 1;
            continue;
        }
        if marker == 0xDA {
            // Scan data follows; the EOI must come somewhere after it.
            return b[i..].windows(2).any(|w| w == [0xFF, 0xD9]);
        }
        if (0xD0..=0xD7).contains(&marker) || marker == 0x01 {
            i += 2;
            continue;
        }
        let len = u16::from_be_bytes([b[i + 2], b[i + 3]]) as usize;
        i += 2 + len;
    }
    false
}

/// Probes all `paths` in parallel; results in the same order.
pub fn probe_all(paths: &[PathBuf]) -> Vec<Result<ImageProbe, String>> {
    paths.par_iter().map(|p| probe_image(p)).collect()
}
