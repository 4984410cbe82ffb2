//! The reference workloads of `../shared/notes/burn-cpu.md`, shared with the PyTorch peer
//! (`scripts/peer_torch.py`): the same layers, loss, batch and view augmentation, so that images
//! per second compare like for like.

use rand::Rng;

use crate::data::{FashionMnist, IMAGE_SIDE};
use crate::models::{ConvEncoderConfig, EncoderConfig, SimclrConfig, VaeConfig};

/// The reference VAE: conv 1->32 (3x3), 32->64, 64->128 (4x4 stride 2), latent 32, a mirrored
/// decoder. This is also the project's default [`VaeConfig`].
pub fn vae() -> VaeConfig {
    VaeConfig {
        encoder: ConvEncoderConfig {
            channels: [32, 64, 128],
        },
        latent_dim: 32,
    }
}

/// The reference SimCLR model: the reference encoder and an MLP 6272 -> 256 -> 128, NT-Xent at
/// temperature 0.5. (The project's default widens the MLP to 512 and draws richer views.)
pub fn simclr() -> SimclrConfig {
    SimclrConfig {
        encoder: EncoderConfig::Conv(ConvEncoderConfig {
            channels: [32, 64, 128],
        }),
        projection_hidden: 256,
        projection_dim: 128,
        temperature: 0.5,
        ..SimclrConfig::default()
    }
}

/// The peer's view of each image of `indices`: shifted by up to 3 pixels each way (zero fill),
/// mirrored with probability 1/2, brightness moved by U(-0.2, 0.2), clipped to [0, 1].
/// Returns `[indices.len(), 28 * 28]` row-major.
pub fn views(data: &FashionMnist, indices: &[usize], rng: &mut impl Rng) -> Vec<f32> {
    let side = IMAGE_SIDE as i64;
    let mut out = Vec::with_capacity(indices.len() * IMAGE_SIDE * IMAGE_SIDE);
    for &i in indices {
        let img = data.image(i);
        let dx = rng.random_range(-3i64..=3);
        let dy = rng.random_range(-3i64..=3);
        let flip = rng.random::<f64>() < 0.5;
        let brightness = rng.random_range(-0.2f32..0.2);
        for r in 0..side {
            let src_r = r - dy;
            for c in 0..side {
                // The peer mirrors first, then shifts: column c reads 27 - c + dx when flipped.
                let src_c = if flip { side - 1 - c + dx } else { c - dx };
                let p = if (0..side).contains(&src_r) && (0..side).contains(&src_c) {
                    crate::data::pixel_value(img[(src_r * side + src_c) as usize])
                } else {
                    0.0
                };
                out.push((p + brightness).clamp(0.0, 1.0));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::batch::rng_for;

    fn ramp() -> FashionMnist {
        FashionMnist::from_pixels((0..784).map(|i| (i % 251) as u8).collect()).unwrap()
    }

    #[test]
    fn views_stay_in_range_and_follow_the_seed() {
        let data = ramp();
        let a = views(&data, &[0, 0, 0], &mut rng_for(1, 0, 0));
        assert_eq!(a.len(), 3 * 784);
        assert!(a.iter().all(|v| (0.0..=1.0).contains(v)));
        assert_eq!(a, views(&data, &[0, 0, 0], &mut rng_for(1, 0, 0)));
        assert_ne!(a, views(&data, &[0, 0, 0], &mut rng_for(2, 0, 0)));
    }

    #[test]
    fn a_view_is_a_shifted_or_mirrored_copy() {
        // Every view pixel, less its brightness offset, is 0 or a source pixel of the same row
        // band: check one view against the four corners of the shift range by brute force.
        let data = ramp();
        let v = views(&data, &[0], &mut rng_for(3, 0, 0));
        let src: Vec<f32> = data.image_f32(0);
        let found = (-3i64..=3).any(|dy| {
            (-3i64..=3).any(|dx| {
                [false, true].iter().any(|&flip| {
                    (-20..=20).any(|b| {
                        let b = b as f32 / 100.0;
                        (0..28i64).all(|r| {
                            (0..28i64).all(|c| {
                                let (sr, sc) = (r - dy, if flip { 27 - c + dx } else { c - dx });
                                let p = if (0..28).contains(&sr) && (0..28).contains(&sc) {
                                    src[(sr * 28 + sc) as usize]
                                } else {
                                    0.0
                                };
                                ((p + b).clamp(0.0, 1.0) - v[(r * 28 + c) as usize]).abs() < 0.006
                            })
                        })
                    })
                })
            })
        });
        assert!(found, "the view is no shift/mirror/brightness of its image");
    }
}
