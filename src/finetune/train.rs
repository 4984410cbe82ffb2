//! One round of training on the bought labels (early stopping on the validation slice), and
//! scoring of image sets with the trained classifier.

use std::collections::HashMap;

use anyhow::{bail, Result};
use burn::module::AutodiffModule;
use burn::nn::loss::CrossEntropyLossConfig;
use burn::optim::decay::WeightDecayConfig;
use burn::optim::{AdamConfig, GradientsParams, Optimizer};
use burn::prelude::*;
use burn::tensor::activation::softmax;
use burn::tensor::backend::AutodiffBackend;
use rand::seq::SliceRandom;
use rand::Rng;

use super::config::FinetuneConfig;
use crate::data::augment::shift_flip;
use crate::data::batch::{images_tensor, rng_for, stream};
use crate::data::{FashionMnist, IMAGE_SIDE};
use crate::models::{host_values, Classifier, ClassifierInput, Encoder};
use crate::progress::{images_bar, log};

/// Which image set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Set {
    Pool,
    Test,
}

/// Where the classifier's inputs come from: encoder features computed once (frozen encoder), or
/// the images (the encoder trains). Bought images also have `augment_copies` fixed augmented
/// copies each (copy 0 is the image itself); an epoch shows every image once, as one of its copies.
pub struct Inputs<'a> {
    pub pool: &'a FashionMnist,
    pub test: &'a FashionMnist,
    /// `Some((pool, test, dim))`: row-major features of a frozen encoder.
    pub features: Option<(Vec<f32>, Vec<f32>, usize)>,
    /// Features of the augmented copies of bought images, by item (frozen encoder only).
    aug_features: HashMap<usize, Vec<f32>>,
    /// Per-dimension mean and 1/std of the pool's features (label-free), applied to every
    /// feature row when `model.standardize` is on.
    scaling: Option<(Vec<f32>, Vec<f32>)>,
    copies: usize,
    shift: usize,
    seed: u64,
}

impl<'a> Inputs<'a> {
    pub fn new(
        pool: &'a FashionMnist,
        test: &'a FashionMnist,
        features: Option<(Vec<f32>, Vec<f32>, usize)>,
        cfg: &FinetuneConfig,
    ) -> Self {
        let mut features = features;
        let mut scaling = None;
        if let (Some((pool_f, test_f, dim)), true) = (&mut features, cfg.model.standardize) {
            let s = feature_scaling(pool_f, *dim);
            apply_scaling(pool_f, &s);
            apply_scaling(test_f, &s);
            scaling = Some(s);
        }
        Self {
            pool,
            test,
            features,
            scaling,
            aug_features: HashMap::new(),
            copies: cfg.train.augment_copies,
            shift: cfg.train.augment_shift,
            seed: cfg.train.seed,
        }
    }

    /// The per-feature `(mean, 1 / std)` applied to frozen-encoder features, if any.
    pub fn scaling(&self) -> Option<&(Vec<f32>, Vec<f32>)> {
        self.scaling.as_ref()
    }

    fn images(&self, set: Set) -> &FashionMnist {
        match set {
            Set::Pool => self.pool,
            Set::Test => self.test,
        }
    }

    /// Augmented copy `copy` (1-based) of pool image `item`: the same pixels in every round and
    /// after a resume.
    fn augmented(&self, item: usize, copy: usize) -> Vec<f32> {
        let mut rng = rng_for(self.seed, stream::AUGMENT, (item * 64 + copy) as u64);
        shift_flip(self.pool.image(item), self.shift, &mut rng)
    }

    /// With a frozen encoder, computes the features of the augmented copies of `items` that are
    /// not cached yet.
    pub fn prepare_augmented<B: Backend>(
        &mut self,
        encoder: Option<&Encoder<B>>,
        items: &[usize],
        device: &B::Device,
    ) -> Result<()> {
        let (Some(encoder), Some((_, _, dim))) = (encoder, &self.features) else {
            return Ok(());
        };
        let dim = *dim;
        let todo: Vec<usize> = items
            .iter()
            .copied()
            .filter(|i| !self.aug_features.contains_key(i))
            .collect();
        if self.copies == 0 || todo.is_empty() {
            return Ok(());
        }
        let px = IMAGE_SIDE * IMAGE_SIDE;
        for chunk in todo.chunks(256) {
            let mut values = Vec::with_capacity(chunk.len() * self.copies * px);
            for &item in chunk {
                for copy in 1..=self.copies {
                    values.extend(self.augmented(item, copy));
                }
            }
            let n = chunk.len() * self.copies;
            let x = Tensor::<B, 4>::from_data(
                TensorData::new(values, [n, 1, IMAGE_SIDE, IMAGE_SIDE]),
                device,
            );
            let mut f = host_values(encoder.forward(x))?;
            if let Some(s) = &self.scaling {
                apply_scaling(&mut f, s);
            }
            for (k, &item) in chunk.iter().enumerate() {
                let per = self.copies * dim;
                self.aug_features
                    .insert(item, f[k * per..(k + 1) * per].to_vec());
            }
        }
        Ok(())
    }

    /// The classifier input for `rows` of `set`: `(item, copy)` pairs, copy 0 the original.
    pub fn batch<B: Backend>(
        &self,
        set: Set,
        rows: &[(usize, usize)],
        device: &B::Device,
    ) -> Result<ClassifierInput<B>> {
        match &self.features {
            Some((pool, test, dim)) => {
                let dim = *dim;
                let source = if set == Set::Pool { pool } else { test };
                let mut values = Vec::with_capacity(rows.len() * dim);
                for &(item, copy) in rows {
                    if copy == 0 {
                        values.extend_from_slice(&source[item * dim..(item + 1) * dim]);
                    } else {
                        let Some(aug) = self.aug_features.get(&item) else {
                            bail!("internal: augmented features of item {item} not prepared");
                        };
                        values.extend_from_slice(&aug[(copy - 1) * dim..copy * dim]);
                    }
                }
                Ok(ClassifierInput::Features(Tensor::from_data(
                    TensorData::new(values, [rows.len(), dim]),
                    device,
                )))
            }
            None => {
                if rows.iter().all(|&(_, c)| c == 0) {
                    let idx: Vec<usize> = rows.iter().map(|&(i, _)| i).collect();
                    return Ok(ClassifierInput::Images(images_tensor(
                        self.images(set),
                        &idx,
                        device,
                    )));
                }
                let px = IMAGE_SIDE * IMAGE_SIDE;
                let mut values = Vec::with_capacity(rows.len() * px);
                for &(item, copy) in rows {
                    if copy == 0 {
                        values.extend(self.images(set).image_f32(item));
                    } else {
                        values.extend(self.augmented(item, copy));
                    }
                }
                Ok(ClassifierInput::Images(Tensor::from_data(
                    TensorData::new(values, [rows.len(), 1, IMAGE_SIDE, IMAGE_SIDE]),
                    device,
                )))
            }
        }
    }
}

/// Mean and reciprocal standard deviation of each of the `dim` columns of `rows`.
fn feature_scaling(rows: &[f32], dim: usize) -> (Vec<f32>, Vec<f32>) {
    let n = (rows.len() / dim).max(1) as f64;
    let mut sum = vec![0f64; dim];
    let mut sq = vec![0f64; dim];
    for row in rows.chunks(dim) {
        for (j, &v) in row.iter().enumerate() {
            sum[j] += v as f64;
            sq[j] += (v as f64) * (v as f64);
        }
    }
    let mean: Vec<f32> = sum.iter().map(|s| (s / n) as f32).collect();
    let inv_std = sum
        .iter()
        .zip(&sq)
        .map(|(s, q)| {
            let var = (q / n - (s / n) * (s / n)).max(0.0);
            // Dead units (always 0 after ReLU) stay 0 instead of dividing by zero.
            (1.0 / (var.sqrt() + 1e-3)) as f32
        })
        .collect();
    (mean, inv_std)
}

fn apply_scaling(rows: &mut [f32], (mean, inv_std): &(Vec<f32>, Vec<f32>)) {
    let dim = mean.len();
    for row in rows.chunks_mut(dim) {
        for ((v, m), s) in row.iter_mut().zip(mean).zip(inv_std) {
            *v = (*v - m) * s;
        }
    }
}

/// How a round's training went.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct RoundTraining {
    /// Epochs run (early stopping included).
    pub epochs: u64,
    /// The epoch whose weights were kept (best validation accuracy, then loss).
    pub best_epoch: u64,
    #[serde(deserialize_with = "super::report::nan_from_null")]
    pub validation_accuracy: f64,
    #[serde(deserialize_with = "super::report::nan_from_null")]
    pub validation_loss: f64,
    /// Mean training loss of the kept epoch.
    pub train_loss: f64,
}

/// Dropout keep-mask `[rows, width]` with entries 0 or `1 / (1 - p)`, drawn from `rng`.
pub(super) fn keep_mask<B: Backend>(
    rows: usize,
    width: usize,
    p: f64,
    rng: &mut impl Rng,
    device: &B::Device,
) -> Tensor<B, 2> {
    let values = keep_mask_values(rows * width, p, rng);
    Tensor::from_data(TensorData::new(values, [rows, width]), device)
}

/// `len` dropout keep-mask entries, 0 or `1 / (1 - p)`, drawn from `rng`.
fn keep_mask_values(len: usize, p: f64, rng: &mut impl Rng) -> Vec<f32> {
    let scale = (1.0 / (1.0 - p)) as f32;
    (0..len)
        .map(|_| if rng.random::<f64>() < p { 0.0 } else { scale })
        .collect()
}

fn targets<B: Backend>(labels: &[u8], device: &B::Device) -> Tensor<B, 1, Int> {
    let values: Vec<i64> = labels.iter().map(|&l| l as i64).collect();
    Tensor::from_data(TensorData::new(values, [labels.len()]), device)
}

/// Trains `model` on `train` (pairs of pool item and label) for round `round`, keeping the epoch
/// with the best accuracy on `val` (ties: lower loss); stops after `patience` epochs without
/// improvement. Without validation labels it trains `max_epochs` and keeps the last.
///
/// Progress: a bar per epoch on a terminal, and an epoch line at most every
/// `report.epoch_log_seconds` (30 by default: a round of a few hundred labels ends in seconds
/// and logs none; one of tens of thousands, or with the encoder unfrozen, shows it is alive and
/// how it goes).
pub fn train_round<B: AutodiffBackend>(
    mut model: Classifier<B>,
    train: &[(usize, u8)],
    val: &[(usize, u8)],
    inputs: &Inputs,
    cfg: &FinetuneConfig,
    round: u32,
    device: &B::Device,
) -> Result<(Classifier<B>, RoundTraining)> {
    let t = &cfg.train;
    let seed = t.seed;
    let mut optim = AdamConfig::new()
        .with_weight_decay(Some(WeightDecayConfig::new(t.weight_decay as f32)))
        .init::<B, Classifier<B>>();
    let ce = CrossEntropyLossConfig::new().init(device);
    let mut best: Option<(Classifier<B>, RoundTraining)> = None;
    let mut since_best = 0;
    let mut step: u64 = 0;
    let mut last_log = std::time::Instant::now();
    for epoch in 1..=t.max_epochs {
        let mut rng = rng_for(seed, stream::FINETUNE_ORDER, ((round as u64) << 20) + epoch);
        // An epoch is one pass, or several when that is fewer than `min_steps_per_epoch` steps:
        // with a few dozen labels a pass is one or two steps, too few between two validations.
        let steps = train
            .len()
            .div_ceil(t.batch_size)
            .max(t.min_steps_per_epoch);
        let single_pass = steps == train.len().div_ceil(t.batch_size);
        let mut rows: Vec<(usize, usize, u8)> = Vec::new();
        while rows.len() < train.len() || (!single_pass && rows.len() < steps * t.batch_size) {
            let mut order: Vec<(usize, u8)> = train.to_vec();
            order.shuffle(&mut rng);
            rows.extend(
                order
                    .iter()
                    .map(|&(i, l)| (i, rng.random_range(0..=t.augment_copies), l)),
            );
        }
        if !single_pass {
            rows.truncate(steps * t.batch_size);
        }
        let bar = images_bar(
            rows.len() as u64,
            0,
            &format!("round {round}, epoch {epoch}"),
        );
        // Each step's loss stays on the device until the epoch ends: one copy to the host per
        // epoch instead of a device synchronisation per step.
        let mut losses: Vec<(Tensor<B::InnerBackend, 1>, usize)> = Vec::new();
        for chunk in rows.chunks(t.batch_size) {
            let pairs: Vec<(usize, usize)> = chunk.iter().map(|&(i, c, _)| (i, c)).collect();
            let labels: Vec<u8> = chunk.iter().map(|&(_, _, l)| l).collect();
            let input = inputs.batch::<B>(Set::Pool, &pairs, device)?;
            // Only the low 28 bits of a counter count (see `rng_for`): the round bits drop out, so
            // step k of every round draws the same mask. Harmless (each round trains a fresh head
            // on another data order), and the README's measured runs used this; changing it changes
            // them.
            let mut mask_rng = rng_for(seed, stream::DROPOUT, ((round as u64) << 32) + step);
            let mask = keep_mask::<B>(
                chunk.len(),
                model.embedding_dim(),
                cfg.model.dropout,
                &mut mask_rng,
                device,
            );
            let logits = model.forward(input, Some(mask));
            let loss = ce.forward(logits, targets::<B>(&labels, device));
            let grads = GradientsParams::from_grads(loss.backward(), &model);
            model = optim.step(t.learning_rate, model, grads);
            losses.push((loss.inner(), chunk.len()));
            step += 1;
            bar.inc(chunk.len() as u64);
        }
        let (sizes, losses): (Vec<usize>, Vec<_>) = losses.into_iter().map(|(l, n)| (n, l)).unzip();
        let values = if losses.is_empty() {
            Vec::new()
        } else {
            host_values(Tensor::cat(losses, 0))?
        };
        let (mut loss_sum, mut seen) = (0.0f64, 0usize);
        for (&loss, n) in values.iter().zip(sizes) {
            let loss = loss as f64;
            if !loss.is_finite() {
                bail!(
                    "the training loss became {loss} in round {round}, epoch {epoch}: try a lower \
                     train.learning_rate"
                );
            }
            loss_sum += loss * n as f64;
            seen += n;
        }
        let train_loss = loss_sum / seen.max(1) as f64;
        let report = if val.is_empty() {
            RoundTraining {
                epochs: epoch,
                best_epoch: epoch,
                validation_accuracy: f64::NAN,
                validation_loss: f64::NAN,
                train_loss,
            }
        } else {
            let items: Vec<usize> = val.iter().map(|&(i, _)| i).collect();
            let scores = score(
                &model.valid(),
                inputs,
                Set::Pool,
                &items,
                cfg,
                false,
                0,
                device,
            )?;
            let (acc, loss) = accuracy_and_loss(&scores.probs, val.iter().map(|&(_, l)| l));
            RoundTraining {
                epochs: epoch,
                best_epoch: epoch,
                validation_accuracy: acc,
                validation_loss: loss,
                train_loss,
            }
        };
        let better = match &best {
            None => true,
            Some((_, b)) if val.is_empty() => report.epochs > b.epochs,
            Some((_, b)) => {
                report.validation_accuracy > b.validation_accuracy
                    || (report.validation_accuracy == b.validation_accuracy
                        && report.validation_loss < b.validation_loss)
            }
        };
        let mut stop = false;
        if better {
            best = Some((model.clone(), report.clone()));
            since_best = 0;
        } else {
            since_best += 1;
            stop = since_best >= t.patience;
        }
        if let Some((_, b)) = &mut best {
            b.epochs = epoch;
        }
        if last_log.elapsed().as_secs_f64() >= cfg.report.epoch_log_seconds {
            let validation = match &best {
                Some((_, b)) if !val.is_empty() => format!(
                    ", validation accuracy {:.2}% (best {:.2}% at epoch {})",
                    100.0 * report.validation_accuracy,
                    100.0 * b.validation_accuracy,
                    b.best_epoch
                ),
                _ => String::new(),
            };
            log(
                Some(&bar),
                &format!(
                    "round {round}, epoch {epoch}: train loss {train_loss:.4}{validation}, \
                     {:.0} img/s",
                    bar.per_sec()
                ),
            );
            last_log = std::time::Instant::now();
        }
        bar.finish_and_clear();
        if stop {
            break;
        }
    }
    best.ok_or_else(|| anyhow::anyhow!("no training epoch ran"))
}

/// Accuracy and mean cross-entropy of `probs` (`n * classes`) against `labels`.
pub fn accuracy_and_loss(probs: &[f32], labels: impl Iterator<Item = u8>) -> (f64, f64) {
    let classes = crate::data::CLASS_NAMES.len();
    let (mut correct, mut loss, mut n) = (0usize, 0.0f64, 0usize);
    for (row, label) in probs.chunks(classes).zip(labels) {
        if argmax(row) == label as usize {
            correct += 1;
        }
        loss -= (row[label as usize].max(1e-12) as f64).ln();
        n += 1;
    }
    (correct as f64 / n.max(1) as f64, loss / n.max(1) as f64)
}

/// Index of the largest value (the first on ties).
pub fn argmax(row: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in row.iter().enumerate() {
        if v > row[best] {
            best = i;
        }
    }
    best
}

/// Test-time flip: `plain` (the classifier's probabilities of `items` of `set`, `n * classes`)
/// averaged with its probabilities of the mirror images, `n * classes`. A Fashion-MNIST item
/// looks alike mirrored (the stage trains on mirrored views), so the mirror is a second look. The classifier must
/// read images: the semi-supervised stage's model does.
pub fn flip_averaged<B: Backend>(
    model: &Classifier<B>,
    inputs: &Inputs,
    set: Set,
    items: &[usize],
    plain: &[f32],
    cfg: &FinetuneConfig,
    device: &B::Device,
) -> Result<Vec<f32>> {
    let classes = crate::data::CLASS_NAMES.len();
    if plain.len() != items.len() * classes {
        bail!(
            "internal: {} probabilities for {} items",
            plain.len(),
            items.len()
        );
    }
    let mut out = Vec::with_capacity(plain.len());
    for chunk in items.chunks(cfg.train.eval_batch_size) {
        let rows: Vec<(usize, usize)> = chunk.iter().map(|&i| (i, 0)).collect();
        let ClassifierInput::Images(x) = inputs.batch::<B>(set, &rows, device)? else {
            bail!("test-time flip needs a classifier that reads images, not encoder features");
        };
        // Mirror along the width axis of `[n, 1, 28, 28]`.
        let mirrored = model.forward(ClassifierInput::Images(x.flip([3])), None);
        let start = out.len();
        let plain = &plain[start..start + chunk.len() * classes];
        let flipped = host_values(softmax(mirrored, 1))?;
        out.extend(plain.iter().zip(&flipped).map(|(a, b)| 0.5 * (a + b)));
    }
    Ok(out)
}

/// The classifier's view of a set of images.
#[derive(Debug, Default)]
pub struct Scores {
    /// Class probabilities without dropout, `n * classes`.
    pub probs: Vec<f32>,
    /// Hidden-layer embeddings, `n * hidden` (when asked for).
    pub embeddings: Vec<f32>,
    /// MC-dropout class probabilities, `samples * n * classes`, sample-major (when asked for).
    pub mc_probs: Vec<f32>,
}

/// Scores `items` of `set` in batches of `eval_batch_size`: probabilities, with `embeddings` the
/// hidden-layer embeddings, and `mc` MC-dropout samples (for BALD), their masks drawn from the
/// seed.
#[allow(clippy::too_many_arguments)]
pub fn score<B: Backend>(
    model: &Classifier<B>,
    inputs: &Inputs,
    set: Set,
    items: &[usize],
    cfg: &FinetuneConfig,
    embeddings: bool,
    mc: usize,
    device: &B::Device,
) -> Result<Scores> {
    let classes = crate::data::CLASS_NAMES.len();
    let width = model.embedding_dim();
    let mut out = Scores::default();
    let mut mc_chunks: Vec<Vec<f32>> = vec![Vec::new(); mc];
    for (c, chunk) in items.chunks(cfg.train.eval_batch_size).enumerate() {
        let n = chunk.len();
        let rows: Vec<(usize, usize)> = chunk.iter().map(|&i| (i, 0)).collect();
        let emb = model.embed(inputs.batch::<B>(set, &rows, device)?);
        // Everything this batch gives back, flattened, for one copy to the host: the
        // probabilities, then each MC-dropout sample's, then (if asked) the embeddings.
        let mut parts = vec![softmax(model.logits(emb.clone(), None), 1).reshape([n * classes])];
        if mc > 0 {
            // The masks of all samples in one host buffer and one upload; sample `s` draws from
            // its own seeded stream, as before.
            let mut values = Vec::with_capacity(mc * n * width);
            for s in 0..mc {
                let mut rng = rng_for(
                    cfg.train.seed,
                    stream::DROPOUT,
                    (1u64 << 63) + ((c as u64) << 16) + s as u64,
                );
                values.extend(keep_mask_values(n * width, cfg.model.dropout, &mut rng));
            }
            let masks = Tensor::<B, 2>::from_data(TensorData::new(values, [mc * n, width]), device);
            for s in 0..mc {
                let mask = masks.clone().narrow(0, s * n, n);
                parts
                    .push(softmax(model.logits(emb.clone(), Some(mask)), 1).reshape([n * classes]));
            }
        }
        if embeddings {
            parts.push(emb.reshape([n * width]));
        }
        let host = host_values(Tensor::cat(parts, 0))?;
        let (probs, rest) = host.split_at(n * classes);
        out.probs.extend_from_slice(probs);
        let (mc_part, emb_part) = rest.split_at(mc * n * classes);
        for (dst, sample) in mc_chunks.iter_mut().zip(mc_part.chunks(n * classes)) {
            dst.extend_from_slice(sample);
        }
        out.embeddings.extend_from_slice(emb_part);
    }
    for chunk in mc_chunks {
        out.mc_probs.extend(chunk);
    }
    debug_assert_eq!(out.probs.len(), items.len() * classes);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::EncoderConfig;
    use burn::backend::Flex;

    /// Three generated images: left-right symmetric, a bar on the left, a gradient.
    fn images(mirror: bool) -> Vec<u8> {
        let side = IMAGE_SIDE;
        let mut px = vec![0u8; 3 * side * side];
        for r in 0..side {
            for c in 0..side {
                let col = if mirror { side - 1 - c } else { c };
                px[r * side + c] = if (8..20).contains(&c) { 200 } else { 10 };
                px[side * side + r * side + c] = if col < 6 { 255 } else { 0 };
                px[2 * side * side + r * side + c] = (col * 9 + r) as u8;
            }
        }
        px
    }

    #[test]
    fn the_flip_averages_each_image_with_its_mirror() {
        let device = Default::default();
        let encoder = EncoderConfig::default().init::<Flex>(&device);
        let dim = EncoderConfig::default().feature_dim();
        let model: Classifier<Flex> = Classifier::new(Some(encoder), dim, 16, 10, &device);
        let cfg = FinetuneConfig::default();
        let plain_set = FashionMnist::from_pixels(images(false)).unwrap();
        let mirror_set = FashionMnist::from_pixels(images(true)).unwrap();
        let items = [0, 1, 2];
        let plain_inputs = Inputs::new(&plain_set, &plain_set, None, &cfg);
        let mirror_inputs = Inputs::new(&mirror_set, &mirror_set, None, &cfg);
        let plain = score(
            &model,
            &plain_inputs,
            Set::Test,
            &items,
            &cfg,
            false,
            0,
            &device,
        )
        .unwrap()
        .probs;
        let mirrored = score(
            &model,
            &mirror_inputs,
            Set::Pool,
            &items,
            &cfg,
            false,
            0,
            &device,
        )
        .unwrap()
        .probs;
        let averaged = flip_averaged(
            &model,
            &plain_inputs,
            Set::Test,
            &items,
            &plain,
            &cfg,
            &device,
        )
        .unwrap();
        assert_eq!(averaged.len(), 30);
        for k in 0..30 {
            let want = 0.5 * (plain[k] + mirrored[k]);
            assert!((averaged[k] - want).abs() < 1e-5, "{k}: {averaged:?}");
        }
        // The symmetric image is its own mirror; the others are not.
        for k in 0..10 {
            assert!((averaged[k] - plain[k]).abs() < 1e-5);
        }
        let moved: f32 = (10..30).map(|k| (averaged[k] - plain[k]).abs()).sum();
        assert!(moved > 1e-4, "the flip changed nothing: {averaged:?}");
        let rows: f32 = averaged.iter().sum();
        assert!((rows - 3.0).abs() < 1e-4);

        // Encoder features cannot be mirrored: an error, not a wrong answer.
        let features = Inputs::new(
            &plain_set,
            &plain_set,
            Some((vec![0.0; 3 * 4], vec![0.0; 3 * 4], 4)),
            &cfg,
        );
        let head: Classifier<Flex> = Classifier::new(None, 4, 8, 10, &device);
        let err =
            flip_averaged(&head, &features, Set::Test, &items, &plain, &cfg, &device).unwrap_err();
        assert!(err.to_string().contains("test-time flip"), "{err}");
    }
}
