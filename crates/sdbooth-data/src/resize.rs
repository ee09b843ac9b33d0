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

/// Resizes as kohya's resize_image does. `interp` is a validated name or None.
pub(crate) fn resize<P>(
    src: &ImageBuffer<P, Vec<u8>>,
    nw: u32,
    nh: u32,
    interp: Option<&str>,
) -> ImageBuffer<P, Vec<u8>>
where
    P: Pixel<Subpixel = u8> + 'static,
{
    let (w, h) = src.dimensions();
    let shrink = w >= nw && h >= nh;
    let method = interp.unwrap_or(if shrink { "area" } else { "lanczos" });
    let filter = match method {
        "area" | "box" if shrink => return area_downscale(src, nw, nh),
        // OpenCV's INTER_AREA enlarges bilinearly.
        "area" | "box" | "bilinear" | "linear" => FilterType::Triangle,
        "nearest" => FilterType::Nearest,
        "bicubic" | "cubic" => FilterType::CatmullRom,
        // PIL's LANCZOS (a = 3); kohya sends "lanczos4" to PIL too.
        _ => FilterType::Lanczos3,
    };
    image::imageops::resize(src, nw, nh, filter)
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{Rgb, RgbImage};

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
