//! kohya's resize_image: area averaging (OpenCV INTER_AREA) when shrinking both sides, PIL
//! Lanczos otherwise, unless `resize_interpolation` names a method.

use image::imageops::FilterType;
use image::{ImageBuffer, Pixel};

/// Separable area resampling for shrinking: each output pixel is the coverage-weighted mean of
/// the source pixels under it, which is what INTER_AREA computes for downscaling.
pub(crate) fn area_downscale<P>(src: &ImageBuffer<P, Vec<u8>>, nw: u32, nh: u32) -> ImageBuffer<P, Vec<u8>>
where
    P: Pixel<Subpixel = u8>,
{
    let (w, h) = src.dimensions();
    let c = P::CHANNEL_COUNT as usize;
    let weights = |n_src: u32, n_dst: u32| -> Vec<Vec<(usize, f64)>> {
        let scale = n_src as f64 / n_dst as f64;
        (0..n_dst)
            .map(|d| {
                let (a, b) = (d as f64 * scale, (d as f64 + 1.0) * scale);
                let mut ws = Vec::new();
                let mut s = a.floor() as usize;
                while (s as f64) < b && s < n_src as usize {
                    let cover = (b.min(s as f64 + 1.0) - a.max(s as f64)).max(0.0);
                    if cover > 1e-12 {
                        ws.push((s, cover / scale));
                    }
                    s += 1;
                }
                ws
            })
            .collect()
    };
    let wx = weights(w, nw);
    let wy = weights(h, nh);
    let raw = src.as_raw();
    // Horizontal pass into f64 rows, then vertical pass.
    let mut tmp = vec![0f64; (nw as usize) * (h as usize) * c];
    for y in 0..h as usize {
        for (x, ws) in wx.iter().enumerate() {
            for ch in 0..c {
                let mut acc = 0.0;
                for &(sx, wgt) in ws {
                    acc += raw[(y * w as usize + sx) * c + ch] as f64 * wgt;
                }
                tmp[(y * nw as usize + x) * c + ch] = acc;
            }
        }
    }
    let mut out = vec![0u8; (nw as usize) * (nh as usize) * c];
    for (y, ws) in wy.iter().enumerate() {
        for x in 0..nw as usize {
            for ch in 0..c {
                let mut acc = 0.0;
                for &(sy, wgt) in ws {
                    acc += tmp[(sy * nw as usize + x) * c + ch] * wgt;
                }
                out[(y * nw as usize + x) * c + ch] = acc.round().clamp(0.0, 255.0) as u8;
            }
        }
    }
    ImageBuffer::from_raw(nw, nh, out).unwrap_or_else(|| ImageBuffer::new(nw, nh))
}

/// PIL's Lanczos kernel (a = 3).
fn lanczos3(x: f64) -> f64 {
    fn sinc(x: f64) -> f64 {
        if x == 0.0 {
            1.0
        } else {
            let px = std::f64::consts::PI * x;
            px.sin() / px
        }
    }
    if (-3.0..3.0).contains(&x) {
        sinc(x) * sinc(x / 3.0)
    } else {
        0.0
    }
}

/// PIL's fixed-point precision for 8-bit resampling.
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// PIL's precompute_coeffs + normalize_coeffs_8bpc: for each output index, the first input
/// index and the fixed-point weights.
fn pil_coeffs(in_size: u32, out_size: u32) -> Vec<(usize, Vec<i64>)> {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = 3.0 * filterscale;
    let ss = 1.0 / filterscale;
    (0..out_size)
        .map(|xx| {
            let center = (xx as f64 + 0.5) * scale;
            let xmin = ((center - support + 0.5) as i64).max(0);
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64) - xmin;
            let mut k: Vec<f64> =
                (0..xmax.max(0)).map(|x| lanczos3((x as f64 + xmin as f64 - center + 0.5) * ss)).collect();
            let ww: f64 = k.iter().sum();
            if ww != 0.0 {
                for v in k.iter_mut() {
                    *v /= ww;
                }
            }
            let fixed = k
                .iter()
                .map(|v| {
                    let f = v * (1i64 << PRECISION_BITS) as f64;
                    if *v < 0.0 {
                        (f - 0.5) as i64
                    } else {
                        (f + 0.5) as i64
                    }
                })
                .collect();
            (xmin as usize, fixed)
        })
        .collect()
}

/// PIL's Image.resize(..., LANCZOS) for 8-bit images: horizontal pass, then vertical, each
/// rounded and clipped to 8 bits, as ImagingResample does.
pub(crate) fn pil_lanczos<P>(src: &ImageBuffer<P, Vec<u8>>, nw: u32, nh: u32) -> ImageBuffer<P, Vec<u8>>
where
    P: Pixel<Subpixel = u8>,
{
    let (w, h) = src.dimensions();
    let c = P::CHANNEL_COUNT as usize;
    let round = 1i64 << (PRECISION_BITS - 1);
    let clip = |v: i64| (v >> PRECISION_BITS).clamp(0, 255) as u8;
    let raw = src.as_raw();
    let (mut cur, mut cw) = (raw.clone(), w as usize);
    if nw != w {
        let cx = pil_coeffs(w, nw);
        let mut out = vec![0u8; nw as usize * h as usize * c];
        for y in 0..h as usize {
            for (x, (xmin, k)) in cx.iter().enumerate() {
                for ch in 0..c {
                    let mut acc = round;
                    for (i, kk) in k.iter().enumerate() {
                        acc += cur[(y * cw + xmin + i) * c + ch] as i64 * kk;
                    }
                    out[(y * nw as usize + x) * c + ch] = clip(acc);
                }
            }
        }
        cur = out;
        cw = nw as usize;
    }
    if nh != h {
        let cy = pil_coeffs(h, nh);
        let mut out = vec![0u8; cw * nh as usize * c];
        for (y, (ymin, k)) in cy.iter().enumerate() {
            for x in 0..cw {
                for ch in 0..c {
                    let mut acc = round;
                    for (i, kk) in k.iter().enumerate() {
                        acc += cur[((ymin + i) * cw + x) * c + ch] as i64 * kk;
                    }
                    out[(y * cw + x) * c + ch] = clip(acc);
                }
            }
        }
        cur = out;
    }
    ImageBuffer::from_raw(nw, nh, cur).unwrap_or_else(|| ImageBuffer::new(nw, nh))
}

/// The most memory one resize may take: the same cap the upfront check gives the decoder.
pub(crate) const MAX_RESIZE_BYTES: u64 = 4 << 30;

/// An upper bound of what `resize` allocates to resize RGBA8 `from` → `to`: a copy of the source,
/// the horizontal pass (f64 in area resampling), the output and the per-index weights. It needs
/// sizes only, so the dataset check refuses an impossible resize before any image is decoded.
pub(crate) fn resize_bytes(from: (u32, u32), to: (u32, u32)) -> u64 {
    let (w, h, nw, nh) = (from.0 as u64, from.1 as u64, to.0 as u64, to.1 as u64);
    const CHANNELS: u64 = 4;
    (w * h * CHANNELS)
        .saturating_add((nw * h).saturating_mul(CHANNELS * 8))
        .saturating_add((nw * nh).saturating_mul(CHANNELS))
        .saturating_add((w + h + nw + nh) * 64)
}

/// Err with a message for the user when resizing `from` → `to` would take more than
/// MAX_RESIZE_BYTES (a 1×10,000,000 picture in a 256×1024 bucket is resized to 256×2.56e9).
pub(crate) fn check_resize(from: (u32, u32), to: (u32, u32)) -> Result<(), String> {
    let bytes = resize_bytes(from, to);
    if bytes <= MAX_RESIZE_BYTES {
        return Ok(());
    }
    Err(format!(
        "resizing {}x{} to {}x{} would take {:.1} GiB, over the limit of {} GiB (the aspect ratio is too \
         extreme for the buckets); crop or resize the image",
        from.0,
        from.1,
        to.0,
        to.1,
        bytes as f64 / (1u64 << 30) as f64,
        MAX_RESIZE_BYTES >> 30
    ))
}

/// Resizes as kohya's resize_image does. `interp` is a validated name or None. Refuses (Err with
/// the reason) a resize whose buffers would exceed MAX_RESIZE_BYTES.
pub(crate) fn resize<P>(
    src: &ImageBuffer<P, Vec<u8>>,
    nw: u32,
    nh: u32,
    interp: Option<&str>,
) -> Result<ImageBuffer<P, Vec<u8>>, String>
where
    P: Pixel<Subpixel = u8> + 'static,
{
    let (w, h) = src.dimensions();
    check_resize((w, h), (nw, nh))?;
    let shrink = w >= nw && h >= nh;
    let method = interp.unwrap_or(if shrink { "area" } else { "lanczos" });
    let filter = match method {
        "area" | "box" if shrink => return Ok(area_downscale(src, nw, nh)),
        // OpenCV's INTER_AREA enlarges bilinearly.
        "area" | "box" | "bilinear" | "linear" => FilterType::Triangle,
        "nearest" => FilterType::Nearest,
        "bicubic" | "cubic" => FilterType::CatmullRom,
        // PIL's LANCZOS (a = 3), done as PIL does; kohya sends "lanczos4" to PIL too.
        _ => return Ok(pil_lanczos(src, nw, nh)),
    };
    Ok(image::imageops::resize(src, nw, nh, filter))
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{Rgb, RgbImage};

    #[test]
    fn an_extreme_aspect_ratio_is_refused_before_allocating() {
        // 1×10,000,000 into a 256-wide bucket: 256×2,560,000,000.
        let err = check_resize((1, 10_000_000), (256, 2_560_000_000)).err().unwrap_or_default();
        assert!(err.contains("over the limit of 4 GiB"), "{err}");
        let tall = RgbImage::new(1, 5000);
        assert!(resize(&tall, 256, 5_000_000, None).is_err());
        // An ordinary photo into an ordinary bucket is fine.
        assert!(check_resize((8000, 6000), (683, 512)).is_ok());
        assert!(check_resize((300, 200), (768, 512)).is_ok());
    }

    #[test]
    fn area_halving_is_the_mean_of_2x2_blocks() {
        let mut img = RgbImage::new(4, 2);
        for (x, _, p) in img.enumerate_pixels_mut() {
            *p = Rgb([x as u8 * 10, 100, 0]);
        }
        let out = area_downscale(&img, 2, 1);
        assert_eq!(out.get_pixel(0, 0).0, [5, 100, 0]);
        assert_eq!(out.get_pixel(1, 0).0, [25, 100, 0]);
    }

    #[test]
    fn area_non_integer_scale_weights_by_coverage() {
        // 3 -> 2: output 0 covers src 0 fully and half of src 1.
        let img = RgbImage::from_raw(3, 1, vec![0, 0, 0, 90, 90, 90, 180, 180, 180]).unwrap_or_default();
        let out = area_downscale(&img, 2, 1);
        assert_eq!(out.get_pixel(0, 0).0[0], 30);
        assert_eq!(out.get_pixel(1, 0).0[0], 150);
    }
}

#[cfg(test)]
mod golden {
    use super::*;
    use image::RgbImage;

    fn load(name: &str) -> RgbImage {
        let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/resize").join(name);
        match image::open(&p) {
            Ok(i) => i.to_rgb8(),
            Err(e) => panic!("fixture {}: {e}", p.display()),
        }
    }

    fn max_diff(a: &RgbImage, b: &RgbImage) -> u8 {
        assert_eq!(a.dimensions(), b.dimensions());
        a.as_raw().iter().zip(b.as_raw()).map(|(x, y)| x.abs_diff(*y)).max().unwrap_or(0)
    }

    /// tools/kohya_dataset/make_resize_fixtures.py: OpenCV INTER_AREA and PIL LANCZOS outputs.
    #[test]
    fn area_matches_opencv_and_lanczos_matches_pil() {
        let src = load("src_47x37.png");
        for (w, h) in [(23, 18), (30, 21), (40, 32)] {
            let ours = resize(&src, w, h, None).unwrap_or_default();
            let cv = load(&format!("area_{w}x{h}.png"));
            assert!(max_diff(&ours, &cv) <= 1, "area {w}x{h}: max diff {}", max_diff(&ours, &cv));
        }
        let ours = resize(&src, 70, 55, None).unwrap_or_default();
        let pil = load("lanczos_70x55.png");
        assert_eq!(max_diff(&ours, &pil), 0, "lanczos must match PIL exactly");
    }
}
