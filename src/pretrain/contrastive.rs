//! The contrastive objective of SimCLR and its label-free monitors, on a batch of paired
//! embeddings: `z1[i]` and `z2[i]` are two augmented views of image `i`.

use burn::nn::loss::CrossEntropyLossConfig;
use burn::prelude::*;

/// Rows scaled to unit length: `[n, d] -> [n, d]`.
pub fn normalize_rows<B: Backend>(x: Tensor<B, 2>) -> Tensor<B, 2> {
    let norm = x.clone().powi_scalar(2).sum_dim(1).add_scalar(1e-12).sqrt();
    x / norm
}

/// Cosine similarities of all `2n` views with each other, divided by `temperature`, with each
/// view's similarity to itself pushed to a large negative number (it must never be the answer):
/// `[n, d], [n, d] -> [2n, 2n]`. Row `i` has its positive at column `(i + n) mod 2n`.
fn similarity_logits<B: Backend>(
    z1: Tensor<B, 2>,
    z2: Tensor<B, 2>,
    temperature: f64,
) -> Tensor<B, 2> {
    let [n, _] = z1.dims();
    let z = normalize_rows(Tensor::cat(vec![z1, z2], 0));
    let sim = z.clone().matmul(z.transpose()) / temperature;
    let device = sim.device();
    sim - Tensor::<B, 2>::eye(2 * n, &device) * 1e9
}

/// Index of each view's positive: `[n, n+1, ..., 2n-1, 0, 1, ..., n-1]`.
fn positives<B: Backend>(n: usize, device: &B::Device) -> Tensor<B, 1, Int> {
    let values: Vec<i64> = (n..2 * n).chain(0..n).map(|i| i as i64).collect();
    Tensor::from_data(TensorData::new(values, [2 * n]), device)
}

/// NT-Xent (normalised temperature-scaled cross-entropy, SimCLR's loss): for each of the `2n`
/// views, cross-entropy of finding its pair among the other `2n - 1` views by cosine similarity
/// over `temperature`; averaged. `z1`, `z2`: `[n, d]` projections of the two views. Returns `[1]`.
pub fn nt_xent<B: Backend>(z1: Tensor<B, 2>, z2: Tensor<B, 2>, temperature: f64) -> Tensor<B, 1> {
    let [n, _] = z1.dims();
    let device = z1.device();
    let logits = similarity_logits(z1, z2, temperature);
    CrossEntropyLossConfig::new()
        .init(&device)
        .forward(logits, positives::<B>(n, &device))
}

/// Label-free health of a contrastive embedding (Wang and Isola, 2020), on one batch of `[n, d]`
/// embeddings of the two views, as `[1]` tensors left on the device (the training loop copies
/// them to the host together with the loss):
/// - alignment: mean squared distance between the two (normalised) views of an image; lower is
///   better (views of one image agree);
/// - uniformity: `log` of the mean of `exp(-2 |zi - zj|^2)` over pairs of different views; lower
///   is better (embeddings spread over the sphere instead of collapsing);
/// - positive top-1: share of views whose most similar other view is their own pair.
pub fn pair_stat_tensors<B: Backend>(z1: Tensor<B, 2>, z2: Tensor<B, 2>) -> [Tensor<B, 1>; 3] {
    let [n, _] = z1.dims();
    let device = z1.device();
    let (a, b) = (normalize_rows(z1.clone()), normalize_rows(z2.clone()));
    let alignment = (a - b).powi_scalar(2).sum_dim(1).mean();

    let z = normalize_rows(Tensor::cat(vec![z1.clone(), z2.clone()], 0));
    let m = 2 * n;
    // Unit vectors: |zi - zj|^2 = 2 - 2 zi.zj; the diagonal contributes exp(0) = 1 each.
    let gram = z.clone().matmul(z.transpose());
    let kernel = (gram.mul_scalar(4.0).sub_scalar(4.0)).exp().sum();
    let pairs = (m * (m - 1)) as f64;
    let uniformity = kernel.sub_scalar(m as f64).div_scalar(pairs).log();

    let hits = similarity_logits(z1, z2, 1.0)
        .argmax(1)
        .reshape([m])
        .equal(positives::<B>(n, &device))
        .float()
        .mean();
    [alignment, uniformity, hits]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::host_values;
    use anyhow::Result;

    /// [`pair_stat_tensors`] on the host, named.
    #[derive(Debug, Clone, Copy, PartialEq)]
    struct PairStats {
        /// Mean squared distance between the two (normalised) views of an image: lower is better
        /// (views of one image agree).
        alignment: f64,
        /// `log` of the mean of `exp(-2 |zi - zj|^2)` over pairs of different views: lower is better
        /// (embeddings spread over the sphere instead of collapsing).
        uniformity: f64,
        /// Share of views whose most similar other view is their own pair.
        positive_top1: f64,
    }

    /// [`PairStats`] of `[n, d]` embeddings of the two views (copied to the host as three numbers).
    fn pair_stats<B: Backend>(z1: Tensor<B, 2>, z2: Tensor<B, 2>) -> Result<PairStats> {
        let [alignment, uniformity, top1] = pair_stat_tensors(z1, z2);
        let v = host_values(Tensor::cat(vec![alignment, uniformity, top1], 0))?;
        Ok(PairStats {
            alignment: v[0] as f64,
            uniformity: v[1] as f64,
            positive_top1: v[2] as f64,
        })
    }

    use burn::backend::flex::FlexDevice;
    use burn::backend::Flex;
    use rand::Rng;

    fn rows(n: usize, d: usize, seed: u64) -> Vec<Vec<f32>> {
        let mut rng = crate::data::batch::rng_for(seed, 99, 0);
        (0..n)
            .map(|_| (0..d).map(|_| rng.random_range(-1.0..1.0)).collect())
            .collect()
    }

    fn tensor(r: &[Vec<f32>]) -> Tensor<Flex, 2> {
        let d = r[0].len();
        let flat: Vec<f32> = r.iter().flatten().copied().collect();
        Tensor::from_data(TensorData::new(flat, [r.len(), d]), &FlexDevice)
    }

    fn unit(v: &[f32]) -> Vec<f64> {
        let n = v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
        v.iter().map(|x| *x as f64 / n).collect()
    }

    fn dot(a: &[f64], b: &[f64]) -> f64 {
        a.iter().zip(b).map(|(x, y)| x * y).sum()
    }

    /// The textbook definitions, computed naively on the host.
    fn reference(z1: &[Vec<f32>], z2: &[Vec<f32>], t: f64) -> (f64, PairStats) {
        let n = z1.len();
        let z: Vec<Vec<f64>> = z1.iter().chain(z2).map(|v| unit(v)).collect();
        let m = 2 * n;
        let (mut loss, mut hits) = (0.0, 0usize);
        for i in 0..m {
            let pos = (i + n) % m;
            let denom: f64 = (0..m)
                .filter(|&j| j != i)
                .map(|j| (dot(&z[i], &z[j]) / t).exp())
                .sum();
            loss -= (dot(&z[i], &z[pos]) / t).exp().ln() - denom.ln();
            let best = (0..m)
                .filter(|&j| j != i)
                .max_by(|&a, &b| dot(&z[i], &z[a]).total_cmp(&dot(&z[i], &z[b])))
                .unwrap();
            hits += (best == pos) as usize;
        }
        let alignment = (0..n)
            .map(|i| 2.0 - 2.0 * dot(&z[i], &z[i + n]))
            .sum::<f64>()
            / n as f64;
        let mut k = 0.0;
        for i in 0..m {
            for j in 0..m {
                if i != j {
                    k += (-2.0 * (2.0 - 2.0 * dot(&z[i], &z[j]))).exp();
                }
            }
        }
        let uniformity = (k / (m * (m - 1)) as f64).ln();
        (
            loss / m as f64,
            PairStats {
                alignment,
                uniformity,
                positive_top1: hits as f64 / m as f64,
            },
        )
    }

    #[test]
    fn loss_and_stats_match_the_definitions() {
        let (z1, z2) = (rows(12, 5, 1), rows(12, 5, 2));
        let (loss, stats) = reference(&z1, &z2, 0.5);
        let got = host_values(nt_xent(tensor(&z1), tensor(&z2), 0.5)).unwrap()[0] as f64;
        assert!((got - loss).abs() < 1e-4, "nt_xent {got} vs {loss}");
        let s = pair_stats(tensor(&z1), tensor(&z2)).unwrap();
        assert!(
            (s.alignment - stats.alignment).abs() < 1e-4,
            "{s:?} vs {stats:?}"
        );
        assert!(
            (s.uniformity - stats.uniformity).abs() < 1e-4,
            "{s:?} vs {stats:?}"
        );
        assert!(
            (s.positive_top1 - stats.positive_top1).abs() < 1e-6,
            "{s:?} vs {stats:?}"
        );
    }

    #[test]
    fn identical_views_are_found_and_aligned() {
        let z = rows(16, 8, 3);
        // The second view: the same vectors, scaled (normalisation removes the scale).
        let z2: Vec<Vec<f32>> = z
            .iter()
            .map(|v| v.iter().map(|x| x * 3.0).collect())
            .collect();
        let s = pair_stats(tensor(&z), tensor(&z2)).unwrap();
        assert!(s.alignment.abs() < 1e-5);
        assert_eq!(s.positive_top1, 1.0);
        let matched = host_values(nt_xent(tensor(&z), tensor(&z2), 0.1)).unwrap()[0];
        let shuffled: Vec<Vec<f32>> = (0..16).map(|i| z2[(i + 1) % 16].clone()).collect();
        let unmatched = host_values(nt_xent(tensor(&z), tensor(&shuffled), 0.1)).unwrap()[0];
        assert!(matched < unmatched, "{matched} vs {unmatched}");
    }
}
