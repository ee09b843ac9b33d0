//! Aspect-ratio buckets with kohya's exact arithmetic (train_util.BucketManager and
//! model_util.make_bucket_resolutions). Every float operation is done in f64 in the same order
//! as the Python code, so ties and roundings come out the same.

use std::collections::BTreeSet;

/// (width, height)
pub type Reso = (u32, u32);

/// kohya's make_bucket_resolutions: all (w, h) multiples of `divisible` with w*h <= max area,
/// sides within [min_size, max_size], plus the square of the max area; sorted.
pub fn make_bucket_resolutions(max_reso: Reso, min_size: u32, max_size: u32, divisible: u32) -> Vec<Reso> {
    let (mw, mh) = (max_reso.0 as u64, max_reso.1 as u64);
    let max_area = mw * mh;
    let div = divisible.max(1) as u64;
    let mut resos: BTreeSet<Reso> = BTreeSet::new();
    // int(math.sqrt(max_area) // divisible) * divisible
    let side = (((max_area as f64).sqrt() / div as f64).floor() as u64) * div;
    resos.insert((side as u32, side as u32));
    let mut width = min_size as u64;
    while width <= max_size as u64 {
        let height = (max_size as u64).min(((max_area / width) / div) * div);
        if height >= min_size as u64 {
            resos.insert((width as u32, height as u32));
            resos.insert((height as u32, width as u32));
        }
        width += div;
    }
    resos.into_iter().collect()
}

/// The result of choosing a bucket for one image.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BucketChoice {
    pub reso: Reso,
    /// Size the image is resized to before cropping to `reso`.
    pub resized_size: Reso,
    /// bucket aspect ratio minus image aspect ratio (kohya's ar_error).
    pub ar_error: f64,
}

#[derive(Debug, Clone)]
pub struct BucketManager {
    no_upscale: bool,
    max_area: u64,
    reso_steps: u32,
    predefined: Vec<Reso>,
    predefined_ar: Vec<f64>,
}

impl BucketManager {
    /// enable_bucket without bucket_no_upscale: buckets from make_bucket_resolutions.
    pub fn predefined(max_reso: Reso, min_size: u32, max_size: u32, reso_steps: u32) -> Self {
        Self::with_resos(
            make_bucket_resolutions(max_reso, min_size, max_size, reso_steps),
            max_reso,
            reso_steps,
        )
    }

    /// enable_bucket = false: the single bucket of the resolution.
    pub fn fixed(reso: Reso) -> Self {
        Self::with_resos(vec![reso], reso, 1)
    }

    /// bucket_no_upscale: each image gets a bucket from its own size (min/max are ignored).
    pub fn no_upscale(max_reso: Reso, reso_steps: u32) -> Self {
        Self {
            no_upscale: true,
            max_area: max_reso.0 as u64 * max_reso.1 as u64,
            reso_steps: reso_steps.max(1),
            predefined: Vec::new(),
            predefined_ar: Vec::new(),
        }
    }

    fn with_resos(resos: Vec<Reso>, max_reso: Reso, reso_steps: u32) -> Self {
        let predefined_ar = resos.iter().map(|&(w, h)| w as f64 / h as f64).collect();
        Self {
            no_upscale: false,
            max_area: max_reso.0 as u64 * max_reso.1 as u64,
            reso_steps: reso_steps.max(1),
            predefined: resos,
            predefined_ar,
        }
    }

    pub fn predefined_resos(&self) -> &[Reso] {
        &self.predefined
    }

    /// kohya's round_to_steps: round half up, then down to a multiple of the step.
    pub fn round_to_steps(&self, x: f64) -> u32 {
        let x = (x + 0.5) as i64;
        (x - x.rem_euclid(self.reso_steps as i64)).max(0) as u32
    }

    /// kohya's select_bucket. Image sizes must be positive (checked upfront).
    pub fn select_bucket(&self, image_width: u32, image_height: u32) -> BucketChoice {
        let (iw, ih) = (image_width as f64, image_height as f64);
        let aspect_ratio = iw / ih;
        let (reso, resized_size) = if !self.no_upscale {
            let reso = if self.predefined.contains(&(image_width, image_height)) {
                (image_width, image_height)
            } else {
                // np.abs(ar_errors).argmin(): the first minimum in sorted order wins ties.
                let mut best = 0usize;
                let mut best_err = f64::INFINITY;
                for (i, ar) in self.predefined_ar.iter().enumerate() {
                    let e = (ar - aspect_ratio).abs();
                    if e < best_err {
                        best_err = e;
                        best = i;
                    }
                }
                self.predefined.get(best).copied().unwrap_or((image_width, image_height))
            };
            let ar_reso = reso.0 as f64 / reso.1 as f64;
            let scale = if aspect_ratio > ar_reso { reso.1 as f64 / ih } else { reso.0 as f64 / iw };
            let resized = ((iw * scale + 0.5) as u32, (ih * scale + 0.5) as u32);
            (reso, resized)
        } else {
            let resized = if image_width as u64 * image_height as u64 > self.max_area {
                let max_area = self.max_area as f64;
                let resized_width = (max_area * aspect_ratio).sqrt();
                let resized_height = max_area / resized_width;
                let b_width_rounded = self.round_to_steps(resized_width);
                let b_height_in_wr = self.round_to_steps(b_width_rounded as f64 / aspect_ratio);
                let ar_width_rounded = b_width_rounded as f64 / b_height_in_wr as f64;
                let b_height_rounded = self.round_to_steps(resized_height);
                let b_width_in_hr = self.round_to_steps(b_height_rounded as f64 * aspect_ratio);
                let ar_height_rounded = b_width_in_hr as f64 / b_height_rounded as f64;
                if (ar_width_rounded - aspect_ratio).abs() < (ar_height_rounded - aspect_ratio).abs() {
                    (b_width_rounded, (b_width_rounded as f64 / aspect_ratio + 0.5) as u32)
                } else {
                    ((b_height_rounded as f64 * aspect_ratio + 0.5) as u32, b_height_rounded)
                }
            } else {
                (image_width, image_height)
            };
            let s = self.reso_steps;
            ((resized.0 - resized.0 % s, resized.1 - resized.1 % s), resized)
        };
        let ar_error = reso.0 as f64 / reso.1 as f64 - aspect_ratio;
        BucketChoice { reso, resized_size, ar_error }
    }
}

/// kohya's get_crop_ltrb: where the resized image sits in the bucket (for SDXL-style
/// conditioning; kept for parity of the values the loader reports).
pub fn crop_ltrb(bucket: Reso, image_size: Reso) -> (f64, f64, f64, f64) {
    let bucket_ar = bucket.0 as f64 / bucket.1 as f64;
    let image_ar = image_size.0 as f64 / image_size.1 as f64;
    let (rw, rh) = if bucket_ar > image_ar {
        (bucket.1 as f64 * image_ar, bucket.1 as f64)
    } else {
        (bucket.0 as f64, bucket.0 as f64 / image_ar)
    };
    let left = ((bucket.0 as f64 - rw) / 2.0).floor();
    let top = ((bucket.1 as f64 - rh) / 2.0).floor();
    (left, top, left + rw, top + rh)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sd_512_buckets_match_kohya_list() {
        let r = make_bucket_resolutions((512, 512), 256, 1024, 64);
        // Worked out by hand from kohya's loop for 512x512, 256..1024 step 64.
        assert_eq!(r.first(), Some(&(256, 832)));
        assert_eq!(r.last(), Some(&(1024, 256)));
        assert!(r.contains(&(512, 512)) && r.contains(&(384, 640)) && r.contains(&(640, 384)));
        assert!(r.iter().all(|(w, h)| (*w as u64) * (*h as u64) <= 512 * 512));
        assert_eq!(r.len(), 17);
    }

    #[test]
    fn exact_size_wins_and_upscale_scales_short_side() {
        let bm = BucketManager::predefined((512, 512), 256, 1024, 64);
        let c = bm.select_bucket(640, 384);
        assert_eq!(c.reso, (640, 384));
        assert_eq!(c.resized_size, (640, 384));
        let c = bm.select_bucket(100, 100);
        assert_eq!(c.reso, (512, 512));
        assert_eq!(c.resized_size, (512, 512));
    }

    #[test]
    fn no_upscale_keeps_small_images_and_floors_to_steps() {
        let bm = BucketManager::no_upscale((512, 512), 64);
        let c = bm.select_bucket(300, 200);
        assert_eq!(c.reso, (256, 192));
        assert_eq!(c.resized_size, (300, 200));
        let c = bm.select_bucket(1024, 1024);
        assert_eq!(c.reso, (512, 512));
    }
}
