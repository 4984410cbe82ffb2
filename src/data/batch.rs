//! Batches: a seeded order over the dataset, and images as `[batch, 1, 28, 28]` tensors.

use burn::tensor::{backend::Backend, Tensor, TensorData};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::{pixel_value, FashionMnist, IMAGE_SIDE};

/// A reproducible RNG for one purpose (`stream`) at one position (`counter`, e.g. the epoch or the
/// global step). Every random choice in training derives from `(seed, stream, counter)`, so a
/// resumed run draws exactly what an uninterrupted one would: the checkpoint only needs the
/// counters, not a generator's internal state.
///
/// Counters are `2^40` words apart and ChaCha's position wraps at `2^68` words, so only the low 28
/// bits of `counter` count: keep counters below `2^28` (see `augment::view_rng` for a finer split).
pub fn rng_for(seed: u64, stream: u64, counter: u64) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(stream);
    rng.set_word_pos(counter as u128 * (1 << 40));
    rng
}

/// RNG streams, one per purpose.
pub mod stream {
    /// Order of images in an epoch (counter: epoch).
    pub const EPOCH_ORDER: u64 = 1;
    /// Reparameterisation noise (counter: global step).
    pub const NOISE: u64 = 2;
    /// Fixed subsamples for reports (counter: 0).
    pub const REPORT: u64 = 3;
    /// Which bought labels are held out for validation (counter: item).
    pub const VALIDATION: u64 = 4;
    /// Fine-tuning: order and augmented copy per epoch (counter: round and epoch).
    pub const FINETUNE_ORDER: u64 = 5;
    /// Fine-tuning: dropout masks (counter: round and step; MC-dropout scoring: round).
    pub const DROPOUT: u64 = 6;
    /// Augmented copies of bought images (counter: item and copy).
    pub const AUGMENT: u64 = 7;
    /// Acquisition: random picks, k-means seeding, projections (counter: round).
    pub const ACQUIRE: u64 = 8;
    /// SimCLR: the two augmented views of each image of a batch (counter: global step; image `k`
    /// of the batch starts `k << 24` words further on, see `augment::view_rng`).
    pub const VIEWS: u64 = 9;
    /// Semi-supervised stage: order of bought and of pool images (counter: pass, see
    /// `finetune::semi`).
    pub const SEMI_ORDER: u64 = 10;
    /// Semi-supervised stage: weak views (counter: step; image `k` as in `augment::item_rng`).
    pub const SEMI_WEAK: u64 = 11;
    /// Semi-supervised stage: strong views (counter: step, as `SEMI_WEAK`).
    pub const SEMI_STRONG: u64 = 12;
    /// Semi-supervised stage: dropout masks (counter: step).
    pub const SEMI_DROPOUT: u64 = 13;
    /// The random validation slice bought before the cold start (counter: 0).
    pub const VALIDATION_SLICE: u64 = 14;
}

/// The order in which epoch `epoch` visits the `n` images.
pub fn epoch_order(n: usize, seed: u64, epoch: u64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(&mut rng_for(seed, stream::EPOCH_ORDER, epoch));
    order
}

/// `k` distinct indices out of `n`, the same for every run with this `seed`.
pub fn fixed_subsample(n: usize, k: usize, seed: u64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(&mut rng_for(seed, stream::REPORT, 0));
    order.truncate(k.min(n));
    order
}

/// The images at `indices` as a `[indices.len(), 1, 28, 28]` tensor with values in [0, 1].
pub fn images_tensor<B: Backend>(
    data: &FashionMnist,
    indices: &[usize],
    device: &B::Device,
) -> Tensor<B, 4> {
    let px = IMAGE_SIDE * IMAGE_SIDE;
    let mut values = Vec::with_capacity(indices.len() * px);
    for &i in indices {
        values.extend(data.image(i).iter().map(|&p| pixel_value(p)));
    }
    Tensor::from_data(
        TensorData::new(values, [indices.len(), 1, IMAGE_SIDE, IMAGE_SIDE]),
        device,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epoch_order_is_a_reproducible_permutation() {
        let a = epoch_order(1000, 7, 3);
        assert_eq!(a, epoch_order(1000, 7, 3));
        assert_ne!(a, epoch_order(1000, 7, 4));
        assert_ne!(a, epoch_order(1000, 8, 3));
        let mut sorted = a.clone();
        sorted.sort();
        assert_eq!(sorted, (0..1000).collect::<Vec<_>>());
    }

    #[test]
    fn streams_and_counters_are_independent() {
        use rand::Rng;
        let x: u64 = rng_for(1, stream::NOISE, 5).random();
        assert_eq!(x, rng_for(1, stream::NOISE, 5).random::<u64>());
        assert_ne!(x, rng_for(1, stream::NOISE, 6).random::<u64>());
        assert_ne!(x, rng_for(1, stream::EPOCH_ORDER, 5).random::<u64>());
    }
}
