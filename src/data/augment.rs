//! Augmentations of images on the host, seeded by the caller.
//!
//! - [`shift_flip`]: the light augmentation of fine-tuning.
//! - [`augment_view`], [`view_pairs`], [`Prefetcher`]: SimCLR's two strong views per image
//!   ([`ViewAugmentConfig`] says how strong).

mod pairs;
mod view;

pub use pairs::{item_rng, view_pairs, view_rng, Prefetcher, ViewBatch, MAX_VIEW_BATCH};
pub use view::{augment_view, ViewAugmentConfig, MAX_BLUR_SIGMA};

use rand::Rng;

use super::{pixel_value, IMAGE_SIDE};

/// `image` (28x28 bytes) shifted by up to `max_shift` pixels in each direction (zero fill) and
/// flipped left-right with probability 1/2, as values in [0, 1]. Fashion items are left-right
/// symmetric in meaning, and a couple of pixels of shift is within the dataset's own jitter.
pub fn shift_flip(image: &[u8], max_shift: usize, rng: &mut impl Rng) -> Vec<f32> {
    let side = IMAGE_SIDE as isize;
    let m = max_shift as isize;
    let dx = rng.random_range(-m as i64..=m as i64) as isize;
    let dy = rng.random_range(-m as i64..=m as i64) as isize;
    let flip = rng.random_bool(0.5);
    let mut out = vec![0.0f32; IMAGE_SIDE * IMAGE_SIDE];
    for y in 0..side {
        let sy = y - dy;
        if !(0..side).contains(&sy) {
            continue;
        }
        for x in 0..side {
            let sx = if flip { side - 1 - (x - dx) } else { x - dx };
            if (0..side).contains(&sx) {
                out[(y * side + x) as usize] = pixel_value(image[(sy * side + sx) as usize]);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::batch::rng_for;

    #[test]
    fn keeps_range_and_mass_and_is_reproducible() {
        let image: Vec<u8> = (0..784)
            .map(|i| {
                if (i % 28) > 4 && (i % 28) < 20 && i / 28 > 5 {
                    200
                } else {
                    0
                }
            })
            .collect();
        let a = shift_flip(&image, 2, &mut rng_for(1, 9, 0));
        assert_eq!(a, shift_flip(&image, 2, &mut rng_for(1, 9, 0)));
        assert!(a.iter().all(|v| (0.0..=1.0).contains(v)));
        // The object sits away from the border, so a 2-pixel shift keeps all of it.
        let mass = |v: &[f32]| v.iter().sum::<f32>();
        let orig: Vec<f32> = image.iter().map(|&p| pixel_value(p)).collect();
        assert!((mass(&a) - mass(&orig)).abs() < 1e-3);
        let same = shift_flip(&image, 0, &mut rng_for(1, 9, 1));
        let flipped: Vec<f32> = orig
            .chunks(28)
            .flat_map(|r| r.iter().rev().copied())
            .collect();
        assert!(same == orig || same == flipped);
        let differs = (0..20).any(|c| shift_flip(&image, 2, &mut rng_for(1, 9, c)) != orig);
        assert!(differs);
    }
}
