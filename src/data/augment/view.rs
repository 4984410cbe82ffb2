//! One random view of an image for contrastive pretraining (SimCLR): random resized crop, flip,
//! shift, brightness/contrast jitter, Gaussian blur, random erasing, in that order.
//!
//! Crop, flip and shift are folded into one bilinear resampling of the source image (one pass over
//! the 784 output pixels); the photometric steps then work in place on the f32 view.

use anyhow::{bail, Result};
use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::data::{pixel_value, IMAGE_SIDE};

const SIDE: usize = IMAGE_SIDE;
const PIXELS: usize = SIDE * SIDE;

/// Where this section sits in a pipeline file, for error messages.
const KEY: &str = "simclr.augment";
/// Draws of a crop or an erased rectangle before falling back (torchvision's number).
const ATTEMPTS: usize = 10;
/// Aspect ratios (width / height) of erased rectangles, drawn log-uniformly: torchvision's
/// `RandomErasing` default. Not a config key: the area is what matters on 28x28 images.
const ERASE_RATIO: [f32; 2] = [0.3, 3.3];
/// Largest blur sigma accepted. The kernel stops at 5x5 (radius 2), so a larger sigma would only
/// approach a box filter while claiming to be something else.
pub const MAX_BLUR_SIGMA: f64 = 2.0;

/// How one SimCLR view is drawn from an image (`[simclr.augment]` in a pipeline file).
///
/// Values are f64 like the rest of the pipeline file (an f32 field would be saved in the effective
/// config as `0.30000001192092896`); the pixel arithmetic is f32.
///
/// Defaults follow SimCLR's recipe, adapted to 28x28 grayscale: no hue/saturation (there is no
/// colour), a less aggressive crop than ImageNet's 0.08 (a 28-pixel garment cropped to 8% of its
/// area is a few blurry pixels), and blur/erasing off by default.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ViewAugmentConfig {
    /// Random resized crop: range of the crop's area as a fraction of the image's, drawn
    /// uniformly; the crop is resampled (bilinear) back to 28x28. `[1, 1]` with `crop_ratio`
    /// `[1, 1]` is no crop.
    pub crop_scale: [f64; 2],
    /// Random resized crop: range of the crop's aspect ratio (width / height), drawn log-uniformly.
    pub crop_ratio: [f64; 2],
    /// Probability of a left-right mirror.
    pub flip_prob: f64,
    /// After the crop, a shift by up to this many pixels in each direction (uniform integers, zero
    /// fill).
    pub max_shift: usize,
    /// Brightness jitter: pixels are multiplied by a factor drawn from U[1 - b, 1 + b].
    pub brightness: f64,
    /// Contrast jitter: pixels are blended toward the view's mean, `m + (v - m) * f`, with `f` drawn
    /// from U[1 - c, 1 + c].
    pub contrast: f64,
    /// Probability of applying the brightness and contrast jitter (both together, in that order).
    pub jitter_prob: f64,
    /// Probability of a Gaussian blur.
    pub blur_prob: f64,
    /// Range of the blur's sigma in pixels, drawn uniformly. The kernel is 3x3 for sigma <= 0.4
    /// and 5x5 above (edges replicated); at most 2.
    pub blur_sigma: [f64; 2],
    /// Probability of random erasing: a rectangle set to 0, applied last.
    pub erase_prob: f64,
    /// Range of the erased rectangle's area as a fraction of the image's, drawn uniformly.
    pub erase_scale: [f64; 2],
}

impl Default for ViewAugmentConfig {
    fn default() -> Self {
        Self {
            crop_scale: [0.3, 1.0],
            crop_ratio: [0.75, 4.0 / 3.0],
            flip_prob: 0.5,
            max_shift: 2,
            brightness: 0.4,
            contrast: 0.4,
            jitter_prob: 0.8,
            blur_prob: 0.0,
            blur_sigma: [0.1, 1.0],
            erase_prob: 0.0,
            erase_scale: [0.02, 0.2],
        }
    }
}

impl ViewAugmentConfig {
    /// Everything off: every view is the image itself (as values in [0, 1]). A starting point for
    /// tests and for switching on one augmentation at a time.
    pub fn identity() -> Self {
        Self {
            crop_scale: [1.0, 1.0],
            crop_ratio: [1.0, 1.0],
            flip_prob: 0.0,
            max_shift: 0,
            brightness: 0.0,
            contrast: 0.0,
            jitter_prob: 0.0,
            blur_prob: 0.0,
            erase_prob: 0.0,
            ..Self::default()
        }
    }

    /// Refuses values that would panic, silently do nothing useful, or produce an empty image; the
    /// message names the key.
    pub fn validate(&self) -> Result<()> {
        range_key("crop_scale", self.crop_scale, 0.0, Some(1.0))?;
        range_key("crop_ratio", self.crop_ratio, 0.0, None)?;
        prob_key("flip_prob", self.flip_prob)?;
        if self.max_shift >= SIDE {
            bail!(
                "{KEY}.max_shift must be less than {SIDE} pixels, got {}",
                self.max_shift
            );
        }
        // Factors 1 - b must stay >= 0: a negative brightness factor would invert the image.
        for (key, v) in [("brightness", self.brightness), ("contrast", self.contrast)] {
            if !(0.0..=1.0).contains(&v) {
                bail!("{KEY}.{key} must be in [0, 1], got {v}");
            }
        }
        prob_key("jitter_prob", self.jitter_prob)?;
        prob_key("blur_prob", self.blur_prob)?;
        range_key("blur_sigma", self.blur_sigma, 0.0, Some(MAX_BLUR_SIGMA))?;
        prob_key("erase_prob", self.erase_prob)?;
        range_key("erase_scale", self.erase_scale, 0.0, Some(1.0))?;
        Ok(())
    }
}

fn prob_key(key: &str, p: f64) -> Result<()> {
    if !(0.0..=1.0).contains(&p) {
        bail!("{KEY}.{key} must be a probability in [0, 1], got {p}");
    }
    Ok(())
}

/// `[low, high]` with `above < low <= high (<= max)`, all finite.
fn range_key(key: &str, [lo, hi]: [f64; 2], above: f64, max: Option<f64>) -> Result<()> {
    let ok = lo.is_finite() && hi.is_finite() && lo > above && lo <= hi;
    match max {
        Some(max) if !(ok && hi <= max) => {
            bail!("{KEY}.{key} must be [low, high] with {above} < low <= high <= {max}, got [{lo}, {hi}]")
        }
        None if !ok => {
            bail!("{KEY}.{key} must be [low, high] with {above} < low <= high, got [{lo}, {hi}]")
        }
        _ => Ok(()),
    }
}

/// One augmented view of `image` (28x28 bytes, row-major): 784 values in [0, 1], row-major.
/// Every random choice comes from `rng`, so a seeded generator gives the same view every time.
pub fn augment_view(image: &[u8], cfg: &ViewAugmentConfig, rng: &mut impl Rng) -> Vec<f32> {
    let mut out = vec![0.0; PIXELS];
    augment_view_into(image, cfg, rng, &mut out);
    out
}

/// [`augment_view`] into `out` (784 values), which is overwritten: batches write straight into
/// their buffer.
pub(super) fn augment_view_into(
    image: &[u8],
    cfg: &ViewAugmentConfig,
    rng: &mut impl Rng,
    out: &mut [f32],
) {
    assert_eq!(image.len(), PIXELS, "an image is {SIDE}x{SIDE} bytes");
    assert_eq!(out.len(), PIXELS, "a view is {SIDE}x{SIDE} values");
    let [cx0, cy0, cw, ch] = crop_box(cfg, rng);
    let flip = chance(rng, cfg.flip_prob);
    let m = cfg.max_shift as i64;
    let (dx, dy) = if m > 0 {
        (rng.random_range(-m..=m), rng.random_range(-m..=m))
    } else {
        (0, 0)
    };
    let cols = taps(cx0, cw, dx, flip);
    let rows = taps(cy0, ch, dy, false);

    let mut src = [0.0f32; PIXELS];
    for (s, &p) in src.iter_mut().zip(image) {
        *s = pixel_value(p);
    }
    for (row, out_row) in rows.iter().zip(out.chunks_exact_mut(SIDE)) {
        let Some(r) = row else {
            out_row.fill(0.0);
            continue;
        };
        let (top, bottom) = (&src[r.i0 * SIDE..][..SIDE], &src[r.i1 * SIDE..][..SIDE]);
        for (col, o) in cols.iter().zip(out_row.iter_mut()) {
            *o = match col {
                Some(c) => {
                    let t = top[c.i0] + (top[c.i1] - top[c.i0]) * c.f;
                    let b = bottom[c.i0] + (bottom[c.i1] - bottom[c.i0]) * c.f;
                    t + (b - t) * r.f
                }
                None => 0.0,
            };
        }
    }

    if chance(rng, cfg.jitter_prob) {
        let (b, c) = (cfg.brightness as f32, cfg.contrast as f32);
        let b = uniform(rng, 1.0 - b, 1.0 + b);
        let c = uniform(rng, 1.0 - c, 1.0 + c);
        // Clamp after each step, as torchvision does: contrast is taken around the mean of the
        // image as it would be displayed, not of out-of-range values.
        for v in out.iter_mut() {
            *v = (*v * b).clamp(0.0, 1.0);
        }
        let mean = out.iter().sum::<f32>() / PIXELS as f32;
        for v in out.iter_mut() {
            *v = (mean + (*v - mean) * c).clamp(0.0, 1.0);
        }
    }
    if chance(rng, cfg.blur_prob) {
        let [lo, hi] = cfg.blur_sigma.map(|s| s as f32);
        let sigma = uniform(rng, lo, hi);
        blur(out, sigma);
    }
    if chance(rng, cfg.erase_prob) {
        if let Some([x0, y0, w, h]) = erase_box(cfg, rng) {
            for row in out.chunks_exact_mut(SIDE).skip(y0).take(h) {
                row[x0..x0 + w].fill(0.0);
            }
        }
    }
    // Bilinear weights and the blur are convex combinations, but rounding can step outside [0, 1]
    // by an ulp; the model is promised [0, 1].
    for v in out.iter_mut() {
        *v = v.clamp(0.0, 1.0);
    }
}

/// `true` with probability `p`. No draw at all for 0 and 1, so switched-off steps cost nothing.
fn chance(rng: &mut impl Rng, p: f64) -> bool {
    p >= 1.0 || (p > 0.0 && rng.random::<f64>() < p)
}

/// U[lo, hi], also for `lo == hi` (where `random_range` would refuse a half-open range).
fn uniform(rng: &mut impl Rng, lo: f32, hi: f32) -> f32 {
    lo + (hi - lo) * rng.random::<f32>()
}

/// The crop as `[x0, y0, width, height]` in source pixels (continuous: bilinear sampling does not
/// need whole pixels, and it gives more distinct views of a 28-pixel image). torchvision's
/// `RandomResizedCrop` draw; after `ATTEMPTS` boxes that do not fit, the whole image (which is
/// torchvision's fallback for a square image when the ratio range contains 1).
fn crop_box(cfg: &ViewAugmentConfig, rng: &mut impl Rng) -> [f32; 4] {
    let side = SIDE as f32;
    let [lr0, lr1] = cfg.crop_ratio.map(|r| (r as f32).ln());
    let [s0, s1] = cfg.crop_scale.map(|s| s as f32);
    for _ in 0..ATTEMPTS {
        let area = side * side * uniform(rng, s0, s1);
        let ratio = uniform(rng, lr0, lr1).exp();
        let w = (area * ratio).sqrt();
        let h = (area / ratio).sqrt();
        if w <= side && h <= side {
            let x0 = uniform(rng, 0.0, side - w);
            let y0 = uniform(rng, 0.0, side - h);
            return [x0, y0, w, h];
        }
    }
    [0.0, 0.0, side, side]
}

/// Where one output column (or row) reads from: source pixels `i0` and `i1`, weight `f` on `i1`.
#[derive(Clone, Copy)]
struct Tap {
    i0: usize,
    i1: usize,
    f: f32,
}

/// The source taps of the 28 output columns (or rows) of a crop starting at `start` of length
/// `len`, mirrored if `flip`, then shifted by `shift` (`None`: shifted in from outside, zero).
/// Pixel centres map to pixel centres, so a full-size crop samples exactly the source pixels.
fn taps(start: f32, len: f32, shift: i64, flip: bool) -> [Option<Tap>; SIDE] {
    let scale = len / SIDE as f32;
    let last = (SIDE - 1) as f32;
    std::array::from_fn(|x| {
        let c = x as i64 - shift;
        if !(0..SIDE as i64).contains(&c) {
            return None;
        }
        let c = if flip { SIDE as i64 - 1 - c } else { c };
        let s = (start + (c as f32 + 0.5) * scale - 0.5).clamp(0.0, last);
        let i0 = s.floor() as usize;
        Some(Tap {
            i0,
            i1: (i0 + 1).min(SIDE - 1),
            f: s - i0 as f32,
        })
    })
}

/// Separable Gaussian blur in place, edges replicated. Kernel radius 1 (3x3) for sigma <= 0.4,
/// where the weight at distance 2 is below 4e-6, else 2 (5x5).
fn blur(img: &mut [f32], sigma: f32) {
    let radius: usize = if sigma <= 0.4 { 1 } else { 2 };
    let mut k = [0.0f32; 5];
    for (i, w) in k.iter_mut().enumerate().take(2 * radius + 1) {
        let d = i as f32 - radius as f32;
        *w = (-d * d / (2.0 * sigma * sigma)).exp();
    }
    let total: f32 = k.iter().sum();
    k.iter_mut().for_each(|w| *w /= total);
    let k = &k[..2 * radius + 1];
    let at = |i: usize, d: usize| (i + d).saturating_sub(radius).min(SIDE - 1);

    let mut tmp = [0.0f32; PIXELS];
    for y in 0..SIDE {
        let row = &img[y * SIDE..][..SIDE];
        for x in 0..SIDE {
            tmp[y * SIDE + x] = k.iter().enumerate().map(|(d, w)| w * row[at(x, d)]).sum();
        }
    }
    for y in 0..SIDE {
        for x in 0..SIDE {
            img[y * SIDE + x] = k
                .iter()
                .enumerate()
                .map(|(d, w)| w * tmp[at(y, d) * SIDE + x])
                .sum();
        }
    }
}

/// The erased rectangle as `[x0, y0, width, height]` in whole pixels, with an area (in pixels)
/// within `erase_scale` of the image's. torchvision's `RandomErasing` draw; after `ATTEMPTS`
/// misses (rounding can push a small rectangle out of a narrow range), the shape closest to a
/// square that fits the range exactly, and `None` if no whole-pixel rectangle does.
fn erase_box(cfg: &ViewAugmentConfig, rng: &mut impl Rng) -> Option<[usize; 4]> {
    let full = PIXELS as f32;
    let [lo, hi] = cfg.erase_scale.map(|s| s as f32 * full);
    let fits = |w: usize, h: usize| {
        (1..=SIDE).contains(&w) && (1..=SIDE).contains(&h) && (lo..=hi).contains(&((w * h) as f32))
    };
    let (lr0, lr1) = (ERASE_RATIO[0].ln(), ERASE_RATIO[1].ln());
    let mut area = lo;
    let mut shape = None;
    for _ in 0..ATTEMPTS {
        area = uniform(rng, lo, hi);
        let ratio = uniform(rng, lr0, lr1).exp();
        let w = (area * ratio).sqrt().round() as usize;
        let h = (area / ratio).sqrt().round() as usize;
        if fits(w, h) {
            shape = Some((w, h));
            break;
        }
    }
    let (w, h) = shape.or_else(|| {
        let side = area.sqrt();
        let mut hs: Vec<usize> = (1..=SIDE).collect();
        hs.sort_by(|a, b| {
            (*a as f32 - side)
                .abs()
                .total_cmp(&(*b as f32 - side).abs())
        });
        hs.into_iter().find_map(|h| {
            let w = (area / h as f32).round() as usize;
            [w, w.saturating_sub(1), w + 1]
                .into_iter()
                .find(|&w| fits(w, h))
                .map(|w| (w, h))
        })
    })?;
    let x0 = rng.random_range(0..=SIDE - w);
    let y0 = rng.random_range(0..=SIDE - h);
    Some([x0, y0, w, h])
}

/// Every optional step at probability 1 (tests of this module and of `pairs`).
#[cfg(test)]
pub(crate) fn everything_on() -> ViewAugmentConfig {
    ViewAugmentConfig {
        flip_prob: 1.0,
        jitter_prob: 1.0,
        blur_prob: 1.0,
        erase_prob: 1.0,
        ..ViewAugmentConfig::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::batch::{rng_for, stream};

    /// A garment-like blob (values 40..=240) away from the border, zero background.
    fn blob() -> Vec<u8> {
        (0..PIXELS)
            .map(|i| {
                let (x, y) = (i % SIDE, i / SIDE);
                if (6..22).contains(&x) && (5..23).contains(&y) {
                    (40 + (x * 7 + y * 5) % 200) as u8
                } else {
                    0
                }
            })
            .collect()
    }

    fn as_f32(image: &[u8]) -> Vec<f32> {
        image.iter().map(|&p| pixel_value(p)).collect()
    }

    fn mirrored(v: &[f32]) -> Vec<f32> {
        v.chunks(SIDE)
            .flat_map(|r| r.iter().rev().copied())
            .collect()
    }

    fn max_diff(a: &[f32], b: &[f32]) -> f32 {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max)
    }

    fn total_variation(v: &[f32]) -> f32 {
        let mut tv = 0.0;
        for y in 0..SIDE {
            for x in 0..SIDE {
                if x + 1 < SIDE {
                    tv += (v[y * SIDE + x + 1] - v[y * SIDE + x]).abs();
                }
                if y + 1 < SIDE {
                    tv += (v[(y + 1) * SIDE + x] - v[y * SIDE + x]).abs();
                }
            }
        }
        tv
    }

    #[test]
    fn every_option_keeps_shape_and_range() {
        let image = blob();
        let bright: Vec<u8> = vec![250; PIXELS];
        let strong = ViewAugmentConfig {
            brightness: 1.0,
            contrast: 1.0,
            blur_sigma: [0.1, MAX_BLUR_SIGMA],
            erase_scale: [0.02, 0.5],
            crop_scale: [0.05, 1.0],
            crop_ratio: [0.2, 5.0],
            ..everything_on()
        };
        for cfg in [everything_on(), strong] {
            cfg.validate().unwrap();
            for c in 0..200 {
                for img in [&image, &bright] {
                    let v = augment_view(img, &cfg, &mut rng_for(3, stream::VIEWS, c));
                    assert_eq!(v.len(), PIXELS);
                    assert!(v.iter().all(|x| (0.0..=1.0).contains(x)), "{cfg:?}");
                }
            }
        }
    }

    #[test]
    fn same_rng_same_view_and_views_vary() {
        let image = blob();
        let cfg = ViewAugmentConfig::default();
        let a = augment_view(&image, &cfg, &mut rng_for(5, stream::VIEWS, 1));
        assert_eq!(
            a,
            augment_view(&image, &cfg, &mut rng_for(5, stream::VIEWS, 1))
        );
        let b = augment_view(&image, &cfg, &mut rng_for(5, stream::VIEWS, 2));
        assert!(max_diff(&a, &b) > 0.05);
    }

    #[test]
    fn everything_off_is_the_identity() {
        let image = blob();
        for c in 0..20 {
            let v = augment_view(
                &image,
                &ViewAugmentConfig::identity(),
                &mut rng_for(1, stream::VIEWS, c),
            );
            assert!(max_diff(&v, &as_f32(&image)) <= 1e-5);
        }
    }

    #[test]
    fn flip_alone_mirrors() {
        let image = blob();
        let cfg = ViewAugmentConfig {
            flip_prob: 1.0,
            ..ViewAugmentConfig::identity()
        };
        let v = augment_view(&image, &cfg, &mut rng_for(1, stream::VIEWS, 0));
        let m = mirrored(&as_f32(&image));
        assert!(max_diff(&v, &m) <= 1e-5);
        assert!(
            max_diff(&v, &as_f32(&image)) > 0.1,
            "the blob is not symmetric"
        );
    }

    #[test]
    fn shift_alone_moves_the_whole_image() {
        let image = blob();
        let cfg = ViewAugmentConfig {
            max_shift: 2,
            ..ViewAugmentConfig::identity()
        };
        let orig = as_f32(&image);
        let mut shifted = 0;
        for c in 0..30 {
            let v = augment_view(&image, &cfg, &mut rng_for(2, stream::VIEWS, c));
            // The blob is more than 2 pixels from every border: the shift keeps all of it.
            assert!((v.iter().sum::<f32>() - orig.iter().sum::<f32>()).abs() < 1e-3);
            let found = (-2i64..=2).any(|dy| {
                (-2i64..=2).any(|dx| {
                    (0..PIXELS).all(|i| {
                        let (x, y) = ((i % SIDE) as i64 - dx, (i / SIDE) as i64 - dy);
                        let want = if (0..SIDE as i64).contains(&x) && (0..SIDE as i64).contains(&y)
                        {
                            orig[y as usize * SIDE + x as usize]
                        } else {
                            0.0
                        };
                        (v[i] - want).abs() <= 1e-6
                    })
                })
            });
            assert!(found, "view {c} is not a shift by at most 2");
            shifted += usize::from(v != orig);
        }
        assert!(shifted > 20);
    }

    #[test]
    fn crop_zooms_into_a_ramp() {
        // Horizontal ramp: column x has value 9x / 255. A quarter-area square crop is 14x14 source
        // pixels stretched to 28, so neighbouring output columns differ by half a source step.
        let image: Vec<u8> = (0..PIXELS).map(|i| (9 * (i % SIDE)) as u8).collect();
        let cfg = ViewAugmentConfig {
            crop_scale: [0.25, 0.25],
            ..ViewAugmentConfig::identity()
        };
        for c in 0..20 {
            let v = augment_view(&image, &cfg, &mut rng_for(4, stream::VIEWS, c));
            for row in v.chunks(SIDE) {
                assert_eq!(row, &v[..SIDE], "no vertical change on a horizontal ramp");
                // The first and last columns may sample past a source pixel centre at the image
                // edge (clamped); the rest are inside.
                for x in 1..SIDE - 2 {
                    let step = row[x + 1] - row[x];
                    assert!((step - 4.5 / 255.0).abs() < 1e-5, "{step}");
                }
            }
        }
    }

    #[test]
    fn jitter_off_leaves_the_image_and_on_changes_it() {
        let image = blob();
        let off = ViewAugmentConfig {
            brightness: 0.8,
            contrast: 0.8,
            jitter_prob: 0.0,
            ..ViewAugmentConfig::identity()
        };
        let on = ViewAugmentConfig {
            jitter_prob: 1.0,
            ..off.clone()
        };
        for c in 0..20 {
            let v = augment_view(&image, &off, &mut rng_for(6, stream::VIEWS, c));
            assert!(max_diff(&v, &as_f32(&image)) <= 1e-5);
            let v = augment_view(&image, &on, &mut rng_for(6, stream::VIEWS, c));
            assert!(max_diff(&v, &as_f32(&image)) > 1e-3);
        }
        // Brightness alone scales every pixel by one common factor.
        let bright = ViewAugmentConfig {
            contrast: 0.0,
            ..on.clone()
        };
        let v = augment_view(&image, &bright, &mut rng_for(6, stream::VIEWS, 0));
        let o = as_f32(&image);
        let i = o.iter().position(|&p| p > 0.3).unwrap();
        let f = v[i] / o[i];
        assert!((0.2..=1.8).contains(&f) && (f - 1.0).abs() > 1e-3);
        for (a, b) in v.iter().zip(&o) {
            assert!((a - (b * f).min(1.0)).abs() < 1e-5);
        }
    }

    #[test]
    fn erasing_zeroes_one_rectangle_of_the_right_area() {
        // No zero pixel in the image, so the zeros of a view are exactly the erased rectangle.
        let image: Vec<u8> = (0..PIXELS).map(|i| (1 + (i * 37) % 255) as u8).collect();
        for scale in [[0.02, 0.2], [0.1, 0.11], [0.5, 1.0]] {
            let cfg = ViewAugmentConfig {
                erase_prob: 1.0,
                erase_scale: scale,
                ..ViewAugmentConfig::identity()
            };
            cfg.validate().unwrap();
            for c in 0..300 {
                let v = augment_view(&image, &cfg, &mut rng_for(7, stream::VIEWS, c));
                let zeros: Vec<usize> = (0..PIXELS).filter(|&i| v[i] == 0.0).collect();
                let xs = zeros.iter().map(|i| i % SIDE);
                let ys = zeros.iter().map(|i| i / SIDE);
                let (x0, x1) = (xs.clone().min().unwrap(), xs.max().unwrap());
                let (y0, y1) = (ys.clone().min().unwrap(), ys.max().unwrap());
                let area = (x1 - x0 + 1) * (y1 - y0 + 1);
                assert_eq!(zeros.len(), area, "the zeros form a full rectangle");
                let frac = area as f64 / PIXELS as f64;
                assert!(
                    frac >= scale[0] - 1e-6 && frac <= scale[1] + 1e-6,
                    "{frac} outside {scale:?}"
                );
                let outside = (0..PIXELS).filter(|&i| {
                    !((x0..=x1).contains(&(i % SIDE)) && (y0..=y1).contains(&(i / SIDE)))
                });
                assert!(outside.into_iter().all(|i| v[i] == pixel_value(image[i])));
            }
        }
    }

    #[test]
    fn blur_keeps_the_mean_and_smooths() {
        let image = blob();
        let orig = as_f32(&image);
        let mean = |v: &[f32]| v.iter().sum::<f32>() / v.len() as f32;
        // (At sigma 0.1 the neighbour weight is 2e-22: a no-op, rightly, so start at 0.3.)
        for sigma in [[0.3, 0.4], [0.5, 1.0], [1.5, MAX_BLUR_SIGMA]] {
            let cfg = ViewAugmentConfig {
                blur_prob: 1.0,
                blur_sigma: sigma,
                ..ViewAugmentConfig::identity()
            };
            for c in 0..10 {
                let v = augment_view(&image, &cfg, &mut rng_for(8, stream::VIEWS, c));
                // The blob is 5 pixels from the border and the kernel reaches 2: no mass is lost.
                assert!((mean(&v) - mean(&orig)).abs() < 1e-5);
                assert!(total_variation(&v) < total_variation(&orig) - 1e-3);
            }
        }
        // A wider sigma smooths more.
        let tv = |s: f32| {
            let mut v = orig.clone();
            blur(&mut v, s);
            total_variation(&v)
        };
        assert!(tv(1.5) < tv(0.7) && tv(0.7) < tv(0.3));
    }

    #[test]
    fn validate_refuses_out_of_range_values_naming_the_key() {
        ViewAugmentConfig::default().validate().unwrap();
        ViewAugmentConfig::identity().validate().unwrap();
        let d = ViewAugmentConfig::default;
        let cases = [
            (
                ViewAugmentConfig {
                    crop_scale: [0.5, 0.2],
                    ..d()
                },
                "simclr.augment.crop_scale",
            ),
            (
                ViewAugmentConfig {
                    crop_scale: [0.0, 1.0],
                    ..d()
                },
                "simclr.augment.crop_scale",
            ),
            (
                ViewAugmentConfig {
                    crop_ratio: [f64::NAN, 1.0],
                    ..d()
                },
                "simclr.augment.crop_ratio",
            ),
            (
                ViewAugmentConfig {
                    flip_prob: 1.5,
                    ..d()
                },
                "simclr.augment.flip_prob",
            ),
            (
                ViewAugmentConfig {
                    max_shift: 28,
                    ..d()
                },
                "simclr.augment.max_shift",
            ),
            (
                ViewAugmentConfig {
                    brightness: 1.2,
                    ..d()
                },
                "simclr.augment.brightness",
            ),
            (
                ViewAugmentConfig {
                    contrast: -0.1,
                    ..d()
                },
                "simclr.augment.contrast",
            ),
            (
                ViewAugmentConfig {
                    jitter_prob: f64::NAN,
                    ..d()
                },
                "simclr.augment.jitter_prob",
            ),
            (
                ViewAugmentConfig {
                    blur_sigma: [0.1, 3.0],
                    ..d()
                },
                "simclr.augment.blur_sigma",
            ),
            (
                ViewAugmentConfig {
                    erase_prob: -0.5,
                    ..d()
                },
                "simclr.augment.erase_prob",
            ),
            (
                ViewAugmentConfig {
                    erase_scale: [0.2, 1.5],
                    ..d()
                },
                "simclr.augment.erase_scale",
            ),
        ];
        for (cfg, key) in cases {
            let err = cfg.validate().unwrap_err().to_string();
            assert!(err.starts_with(&format!("{key} must")), "{err}");
        }
    }

    #[test]
    fn config_reads_partial_toml_and_refuses_unknown_keys() {
        let cfg: ViewAugmentConfig = toml::from_str("flip_prob = 0.25\ncrop_scale = [0.5, 1]\n")
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(cfg.flip_prob, 0.25);
        assert_eq!(cfg.crop_scale, [0.5, 1.0]);
        assert_eq!(cfg.max_shift, ViewAugmentConfig::default().max_shift);
        let back: ViewAugmentConfig = toml::from_str(&toml::to_string(&cfg).unwrap()).unwrap();
        assert_eq!(back, cfg);
        assert!(toml::from_str::<ViewAugmentConfig>("flip_probability = 0.5\n").is_err());
        // Saved effective configs read as written.
        let saved = toml::to_string(&ViewAugmentConfig::default()).unwrap();
        assert!(saved.contains("crop_scale = [0.3, 1.0]\n"), "{saved}");
        assert!(saved.contains("brightness = 0.4\n"), "{saved}");
    }
}
