//! The semi-supervised stage (FixMatch, Sohn et al. 2020): after the last purchase, the whole
//! network (pretrained encoder and the last round's head) trains on the bought labels and on
//! every other pool image at once.
//!
//! Each step takes `labeled_batch` bought training images (weak view: shift and flip) and
//! `unlabeled_ratio` times as many pool images. The model's prediction on a weak view of a pool
//! image becomes its pseudo-label when confident (top probability >= `threshold`), and the model
//! learns to predict it on a strong view (crop, jitter, erasing). Pseudo-labels live in this loop
//! only: nothing reaches the label database. The validation slice of the bought labels is neither
//! trained on nor used as a pool image, so the choice of the final weights (best validation
//! accuracy) stays honest; the test set is not looked at here.
//!
//! Every random choice derives from `(seed, stream, step)`, so a resumed stage draws exactly what
//! an uninterrupted one would.

use std::time::Instant;

use anyhow::{bail, Result};
use burn::module::{AutodiffModule, Module, Param};
use burn::nn::Linear;
use burn::optim::decay::WeightDecayConfig;
use burn::optim::{AdamConfig, GradientsParams, Optimizer};
use burn::prelude::*;
use burn::tensor::activation::{log_softmax, softmax};
use burn::tensor::backend::AutodiffBackend;
use rand::seq::SliceRandom;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::config::{FinetuneConfig, SemiKeep, SemiTeacher, SemiThresholds};
use super::train::{accuracy_and_loss, argmax, keep_mask, score, Inputs, Set};
use crate::checkpoint::{module_to_bytes, record_from_bytes, record_to_bytes};
use crate::config::warmup_cosine;
use crate::data::augment::{augment_view, item_rng, shift_flip};
use crate::data::batch::{rng_for, stream};
use crate::data::{CLASS_NAMES, IMAGE_SIDE};
use crate::models::{ema_update, host_values, Classifier, ClassifierInput, Encoder};
use crate::progress::{images_bar, log};
use crate::tensorboard::EventWriter;

/// Steps timed before the time budget fixes the stage's length.
const CALIBRATION_STEPS: u64 = 20;

/// Share of the remaining time budget the planned steps may fill (validation and checkpoints take
/// the rest).
const BUDGET_FILL: f64 = 0.93;

/// One validation of the stage.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SemiEval {
    /// Steps done when it ran.
    pub step: u64,
    #[serde(deserialize_with = "super::report::nan_from_null")]
    pub validation_accuracy: f64,
    #[serde(deserialize_with = "super::report::nan_from_null")]
    pub validation_loss: f64,
    /// Mean bought-label and pseudo-label losses and the share of pool images with a confident
    /// pseudo-label, over the steps since the last validation.
    pub labeled_loss: f64,
    pub unlabeled_loss: f64,
    pub mask_rate: f64,
}

/// Where the stage stands: saved in the finetune checkpoint.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SemiProgress {
    /// Optimizer steps done.
    pub step: u64,
    /// Steps the stage runs (`semi.epochs` passes, or fewer to fit the time budget).
    pub total_steps: u64,
    /// Whether `total_steps` is final (the time budget has been applied, or there is none).
    pub planned: bool,
    /// The best validation so far: its weights are the stage's result.
    pub best: Option<SemiEval>,
    pub last: Option<SemiEval>,
    /// Wall-clock seconds spent in the stage, all sessions.
    pub seconds: f64,
    pub finished: bool,
    /// The member under way (`semi.members`), from 0; the earlier ones have finished. `step`,
    /// `total_steps`, `best`, `last` and `finished` are this member's, `seconds` all members'.
    #[serde(default)]
    pub member: usize,
}

/// The stage's weights and optimizer as checkpoint blobs.
pub struct SemiBlobs {
    /// FlexMatch's per-image state ([`SemiState::learned`]).
    pub learned: Vec<u8>,
    pub model: Vec<u8>,
    pub ema: Vec<u8>,
    pub best: Vec<u8>,
    pub optimizer: Vec<u8>,
    /// Selection by loss: [`SemiState::losses`] and [`SemiState::pass`] (empty without it, and in
    /// checkpoints written before it existed).
    pub losses: Vec<u8>,
    pub pass: Vec<u8>,
    /// The kept weights of the finished members, in order (`semi.members > 1`).
    pub members: Vec<Vec<u8>>,
}

/// What the caller saves and what a resume starts from.
pub struct SemiState<B: AutodiffBackend> {
    /// The weights the optimizer trains.
    pub model: Classifier<B>,
    /// Their exponential moving average (`semi.ema_decay`): what is validated and kept.
    pub ema: Classifier<B::InnerBackend>,
    /// The average at the best validation so far: the stage's result.
    pub best: Classifier<B::InnerBackend>,
    pub progress: SemiProgress,
    /// The Adam state record, as bytes (absent before the first step).
    pub optimizer: Option<Vec<u8>>,
    /// FlexMatch: per pool image, the class it was last predicted as with top probability above
    /// `threshold`, or [`NOT_LEARNED`]. Empty until the first step.
    pub learned: Vec<u8>,
    /// Selection by loss (`semi.select_fraction < 1`): per pool image, its pseudo-label loss when
    /// last trained on (NaN: not yet). Empty without selection.
    pub losses: Vec<f32>,
    /// Selection by loss: the pass under way and its order of pool images.
    pub pass: Option<(u64, Vec<usize>)>,
    /// The kept weights of the members that have finished (`progress.member` of them).
    pub members: Vec<Classifier<B::InnerBackend>>,
}

/// [`SemiState::learned`] of an image never predicted confidently.
pub const NOT_LEARNED: u8 = u8::MAX;

impl<B: AutodiffBackend> SemiState<B> {
    /// A fresh stage from `init`.
    pub fn start(init: Classifier<B>) -> Self {
        Self {
            ema: init.valid(),
            best: init.valid(),
            model: init,
            progress: SemiProgress::default(),
            optimizer: None,
            learned: Vec::new(),
            losses: Vec::new(),
            pass: None,
            members: Vec::new(),
        }
    }

    /// The next member's fresh start from `init`, carrying the finished members (this one's kept
    /// weights join them) and the seconds spent.
    pub fn next_member(self, init: Classifier<B>) -> Self {
        let mut members = self.members;
        members.push(self.best);
        let mut next = Self::start(init);
        next.members = members;
        next.progress.member = self.progress.member + 1;
        next.progress.seconds = self.progress.seconds;
        next
    }

    /// Every finished member's kept weights, this one's last (when it has finished): the models
    /// whose predictions the run averages.
    pub fn ensemble(&self) -> Vec<Classifier<B::InnerBackend>> {
        let mut models = self.members.clone();
        models.push(self.best.clone());
        models
    }

    /// A stage restored from checkpoint blobs; `skeleton` has the stage's architecture.
    pub fn restore(
        skeleton: Classifier<B>,
        progress: SemiProgress,
        blobs: SemiBlobs,
        device: &B::Device,
    ) -> Result<Self> {
        let inner = skeleton.valid();
        let inner_skeleton = inner.clone();
        let ema = inner
            .clone()
            .load_record(record_from_bytes::<B::InnerBackend, _>(&blobs.ema, device)?);
        let best = inner.load_record(record_from_bytes::<B::InnerBackend, _>(
            &blobs.best,
            device,
        )?);
        let model = skeleton.load_record(record_from_bytes::<B, _>(&blobs.model, device)?);
        if blobs.members.len() != progress.member {
            bail!(
                "the checkpoint holds {} finished stage members for member {}: it is damaged",
                blobs.members.len(),
                progress.member
            );
        }
        let members = blobs
            .members
            .iter()
            .map(|b| {
                Ok(inner_skeleton
                    .clone()
                    .load_record(record_from_bytes::<B::InnerBackend, _>(b, device)?))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            members,
            model,
            ema,
            best,
            progress,
            optimizer: Some(blobs.optimizer),
            learned: blobs.learned,
            losses: {
                if !blobs.losses.len().is_multiple_of(4) {
                    bail!(
                        "the checkpoint's semi_losses blob is damaged ({} bytes)",
                        blobs.losses.len()
                    );
                }
                blobs.losses
            }
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
            pass: pass_from_bytes(&blobs.pass)?,
        })
    }

    /// The checkpoint blobs of this state.
    pub fn blobs(&self) -> Result<SemiBlobs> {
        Ok(SemiBlobs {
            model: module_to_bytes::<B, _>(self.model.clone())?,
            ema: module_to_bytes::<B::InnerBackend, _>(self.ema.clone())?,
            best: module_to_bytes::<B::InnerBackend, _>(self.best.clone())?,
            optimizer: self.optimizer.clone().unwrap_or_default(),
            learned: self.learned.clone(),
            losses: self.losses.iter().flat_map(|l| l.to_le_bytes()).collect(),
            pass: self
                .pass
                .as_ref()
                .map(|(pass, order)| {
                    let mut b = pass.to_le_bytes().to_vec();
                    b.extend(order.iter().flat_map(|&i| (i as u32).to_le_bytes()));
                    b
                })
                .unwrap_or_default(),
            members: self
                .members
                .iter()
                .map(|m| module_to_bytes::<B::InnerBackend, _>(m.clone()))
                .collect::<Result<_>>()?,
        })
    }
}

/// The seed of stage member `member`: the run's seed for the first (so one member is the stage
/// as before members existed), a distinct stream for each other.
pub fn member_seed(seed: u64, member: usize) -> u64 {
    if member == 0 {
        seed
    } else {
        seed ^ 0x9E37_79B9_7F4A_7C15u64.wrapping_mul(member as u64)
    }
}

/// [`SemiState::pass`] from its blob: the pass (u64) then its items (u32 each), little-endian.
fn pass_from_bytes(b: &[u8]) -> Result<Option<(u64, Vec<usize>)>> {
    if b.is_empty() {
        return Ok(None);
    }
    if b.len() < 8 || !(b.len() - 8).is_multiple_of(4) {
        bail!(
            "the checkpoint's semi_pass blob is damaged ({} bytes)",
            b.len()
        );
    }
    let (head, items) = b.split_at(8);
    let mut pass = [0u8; 8];
    pass.copy_from_slice(head);
    let order = items
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]) as usize)
        .collect();
    Ok(Some((u64::from_le_bytes(pass), order)))
}

/// The starting point of the stage: the pretrained `encoder` (all of it trains) under the last
/// round's `head` (a classifier without encoder, trained on features standardised by
/// `scaling`). The standardisation is folded into the head's first layer, so the result computes
/// exactly what the head did: the stage starts from the last round's predictions.
///
/// Shapes: `scaling` is `(mean, 1 / std)`, each `[feature_dim]`.
pub fn unfreeze<B: Backend>(
    head: Classifier<B>,
    encoder: Encoder<B>,
    scaling: Option<&(Vec<f32>, Vec<f32>)>,
    device: &B::Device,
) -> Classifier<B> {
    let Classifier {
        encoder: _,
        hidden,
        out,
    } = head;
    let fold = |layer: Linear<B>| -> Linear<B> {
        let Some((mean, inv_std)) = scaling else {
            return layer;
        };
        let d = mean.len();
        let w = layer.weight.val();
        let [d_in, d_out] = w.dims();
        debug_assert_eq!(d_in, d);
        let s = Tensor::<B, 1>::from_floats(inv_std.as_slice(), device);
        let ms: Vec<f32> = mean.iter().zip(inv_std).map(|(m, s)| m * s).collect();
        let ms = Tensor::<B, 2>::from_data(TensorData::new(ms, [1, d]), device);
        // x' = (x - m) * s, so x'W + b = x (s W) + (b - (m * s) W).
        let w_folded = w.clone() * s.reshape([d, 1]);
        let shift = ms.matmul(w).reshape([d_out]);
        let b = match &layer.bias {
            Some(b) => b.val() - shift,
            None => shift.neg(),
        };
        Linear {
            weight: Param::from_tensor(w_folded.detach()),
            bias: Some(Param::from_tensor(b.detach())),
        }
    };
    let (hidden, out) = match hidden {
        Some(h) => (Some(fold(h)), out),
        None => (None, fold(out)),
    };
    Classifier {
        encoder: Some(encoder),
        hidden,
        out,
    }
}

/// Each class's confidence threshold for this step. `learned[c]`: pool images last predicted as
/// `c` above `threshold`; `n`: pool images. FlexMatch (Zhang et al. 2021) without its threshold
/// warm-up: `beta_c = learned[c] / max_c learned[c]`, threshold `threshold * beta_c / (2 -
/// beta_c)`; the full `threshold` for every class until some image is learnt. The warm-up (`n -
/// sum learned` in the denominator) is left out: on Fashion-MNIST about 40% of the pool never
/// reaches a 0.95 top probability in a CPU-sized run, which kept every threshold near 0 (every
/// pseudo-label counted, a label-free signal logged as `semi/confident_share`).
pub fn class_thresholds(
    mode: SemiThresholds,
    threshold: f64,
    learned: &[usize],
    n: usize,
) -> Vec<f64> {
    let top = learned.iter().copied().max().unwrap_or(0);
    match mode {
        SemiThresholds::Flex if top > 0 && n > 0 => learned
            .iter()
            .map(|&l| {
                let beta = l as f64 / top as f64;
                threshold * beta / (2.0 - beta)
            })
            .collect(),
        _ => vec![threshold; learned.len()],
    }
}

/// A cycle through `items` in a fresh seeded order each pass. Every pass covers all items, or,
/// for a selective cycle, every pass after the first covers the `later` items with the highest
/// loss when the pass begins (unseen items first). Position `p` of the endless sequence depends
/// only on the seed and on the losses at the start of its pass, so a resumed stage that restores
/// the current pass ([`Cycle::current`]) and the losses draws what an uninterrupted one would.
struct Cycle<'a> {
    items: &'a [usize],
    seed: u64,
    salt: u64,
    /// Items in each pass after the first.
    later: usize,
    pass: Option<(u64, Vec<usize>)>,
}

impl<'a> Cycle<'a> {
    fn new(items: &'a [usize], seed: u64, salt: u64) -> Self {
        Self::selective(items, seed, salt, 1.0)
    }

    /// A cycle whose passes after the first cover `fraction` of the items (at least one).
    fn selective(items: &'a [usize], seed: u64, salt: u64, fraction: f64) -> Self {
        let later = ((items.len() as f64 * fraction).ceil() as usize).clamp(1, items.len().max(1));
        Self {
            items,
            seed,
            salt,
            later,
            pass: None,
        }
    }

    fn is_selective(&self) -> bool {
        self.later < self.items.len()
    }

    /// Positions in the first `passes` passes.
    fn positions(&self, passes: f64) -> f64 {
        let n = self.items.len() as f64;
        if passes <= 1.0 {
            passes * n
        } else {
            n + (passes - 1.0) * self.later as f64
        }
    }

    /// The pass of position `p`, and `p`'s place in it.
    fn locate(&self, p: u64) -> (u64, usize) {
        let n = self.items.len() as u64;
        if p < n {
            (0, p as usize)
        } else {
            let later = self.later as u64;
            (1 + (p - n) / later, ((p - n) % later) as usize)
        }
    }

    /// The current pass and its order, for a checkpoint.
    fn current(&self) -> Option<&(u64, Vec<usize>)> {
        self.pass.as_ref()
    }

    /// Positions `start..start + k`. `loss[item]` (NaN: never seen) ranks the items of a
    /// selective cycle's later passes.
    fn take(&mut self, start: u64, k: usize, loss: &[f32]) -> Vec<usize> {
        (start..start + k as u64)
            .map(|p| {
                let (pass, at) = self.locate(p);
                if self.pass.as_ref().map(|(q, _)| *q) != Some(pass) {
                    let mut order = if pass > 0 && self.is_selective() {
                        hardest(self.items, loss, self.later)
                    } else {
                        self.items.to_vec()
                    };
                    // Two cycles share the stream: even counters for one, odd for the other.
                    order.shuffle(&mut rng_for(
                        self.seed,
                        stream::SEMI_ORDER,
                        pass * 2 + self.salt,
                    ));
                    self.pass = Some((pass, order));
                }
                self.pass.as_ref().map_or(0, |(_, o)| o[at])
            })
            .collect()
    }
}

/// The `k` items of highest `loss` (NaN, never seen, counts as highest), ties by item; in item
/// order, so that the shuffle that follows depends on the seed and the set only.
fn hardest(items: &[usize], loss: &[f32], k: usize) -> Vec<usize> {
    let key = |i: usize| {
        loss.get(i)
            .copied()
            .filter(|l| !l.is_nan())
            .unwrap_or(f32::INFINITY)
    };
    let mut ranked = items.to_vec();
    ranked.sort_by(|&a, &b| key(b).total_cmp(&key(a)).then(a.cmp(&b)));
    ranked.truncate(k);
    ranked.sort_unstable();
    ranked
}

/// `[n, 1, 28, 28]` from row-major 784-value images.
fn images<B: Backend>(values: Vec<f32>, n: usize, device: &B::Device) -> Tensor<B, 4> {
    Tensor::from_data(
        TensorData::new(values, [n, 1, IMAGE_SIDE, IMAGE_SIDE]),
        device,
    )
}

/// Trains the stage from `state` to its planned end (or the time budget), calling `save` with
/// the state every `semi.checkpoint_minutes` and at the end. `labeled` are the bought training
/// labels, `val` the held-out ones (model choice), `pool_items` the unlabeled images (the pool
/// without `val`). `deadline_s`: seconds this session may still spend, if there is a budget.
#[allow(clippy::too_many_arguments)]
pub fn train_semi<B: AutodiffBackend>(
    mut state: SemiState<B>,
    labeled: &[(usize, u8)],
    val: &[(usize, u8)],
    pool_items: &[usize],
    inputs: &Inputs,
    cfg: &FinetuneConfig,
    deadline_s: Option<f64>,
    tb: &mut EventWriter,
    save: &mut dyn FnMut(&SemiState<B>) -> Result<()>,
    device: &B::Device,
) -> Result<SemiState<B>> {
    let s = &cfg.semi;
    let seed = member_seed(cfg.train.seed, state.progress.member);
    if labeled.is_empty() || pool_items.is_empty() {
        bail!("the semi-supervised stage needs bought training labels and pool images");
    }
    let (nl, nu) = (s.labeled_batch, s.unlabeled_batch());
    let steps_per_pass = pool_items.len().div_ceil(nu) as u64;
    let mut pool_cycle = Cycle::selective(pool_items, seed, 1, s.select_fraction);
    let selective = pool_cycle.is_selective();
    // Full passes' worth of pool images in `epochs` passes (fewer when they are selective).
    let full_passes = if selective {
        pool_cycle.positions(s.epochs) / pool_items.len() as f64
    } else {
        s.epochs
    };
    if state.progress.total_steps == 0 {
        state.progress.total_steps = ((full_passes * steps_per_pass as f64).round() as u64).max(1);
        state.progress.planned = deadline_s.is_none();
    }
    let mut optim = AdamConfig::new()
        .with_weight_decay(Some(WeightDecayConfig::new(s.weight_decay as f32)))
        .init::<B, Classifier<B>>();
    if let Some(bytes) = &state.optimizer {
        if !bytes.is_empty() {
            optim = optim.load_record(record_from_bytes::<B, _>(bytes, device)?);
        }
    }
    let pool = inputs.pool;
    // The labeled cycle runs over positions in `labeled`.
    let label_idx: Vec<usize> = (0..labeled.len()).collect();
    let mut labeled_cycle = Cycle::new(&label_idx, seed, 0);
    if selective {
        if state.losses.is_empty() {
            state.losses = vec![f32::NAN; pool.len()];
        } else if state.losses.len() != pool.len() {
            bail!(
                "the checkpoint's semi_losses blob holds {} losses for a pool of {}: it is \
                 damaged or from another run",
                state.losses.len(),
                pool.len()
            );
        }
        pool_cycle.pass = state.pass.take();
    }
    let val_items: Vec<usize> = val.iter().map(|&(i, _)| i).collect();

    let session = Instant::now();
    let seconds_before = state.progress.seconds;
    let start_step = state.progress.step;
    let mut last_save = Instant::now();
    let bar = images_bar(
        state.progress.total_steps * nu as u64,
        start_step * nu as u64,
        "semi-supervised",
    );
    log(
        Some(&bar),
        &format!(
            "semi-supervised stage (FixMatch{}): {} bought training labels, {} pool images, {} steps \
             of {nl} + {nu} images ({:.1} passes over the pool{}); pseudo-labels from {}{}",
            if s.members > 1 {
                format!(", member {} of {}", state.progress.member + 1, s.members)
            } else {
                String::new()
            },
            labeled.len(),
            pool_items.len(),
            state.progress.total_steps,
            state.progress.total_steps as f64 / steps_per_pass as f64,
            if selective {
                format!(
                    "; after the first, each pass trains on the {} images of highest loss",
                    pool_cycle.later
                )
            } else {
                String::new()
            },
            match (s.teacher, s.pseudo_label_flip) {
                (SemiTeacher::Model, false) => "the model's weak views",
                (SemiTeacher::Model, true) => "the model's weak views and their mirrors",
                (SemiTeacher::Ema, false) => "the moving average's weak views",
                (SemiTeacher::Ema, true) => "the moving average's weak views and their mirrors",
            },
            if start_step > 0 {
                format!(", resuming at step {start_step}")
            } else {
                String::new()
            }
        ),
    );
    // Loss parts stay on the device between validations: one copy to the host per validation.
    let mut pending: Vec<Tensor<B::InnerBackend, 1>> = Vec::new();
    let mut masked = (0usize, 0usize);
    let classes = CLASS_NAMES.len();
    if state.learned.len() != pool.len() {
        state.learned = vec![NOT_LEARNED; pool.len()];
    }
    // FlexMatch's counts: pool images learnt per class, and those not learnt yet.
    let mut learned_count = vec![0usize; classes];
    for &item in pool_items {
        if let Some(n) = learned_count.get_mut(state.learned[item] as usize) {
            *n += 1;
        }
    }
    while state.progress.step < state.progress.total_steps {
        let step = state.progress.step;
        // Data: bought images (weak view), pool images (weak and strong views).
        let picks = labeled_cycle.take(step * nl as u64, nl, &[]);
        let unl = pool_cycle.take(step * nu as u64, nu, &state.losses);
        let shift = cfg.train.augment_shift;
        let weak_pool: Vec<f32> = unl
            .par_iter()
            .enumerate()
            .flat_map_iter(|(k, &item)| {
                shift_flip(
                    pool.image(item),
                    shift,
                    &mut item_rng(seed, stream::SEMI_WEAK, step, k),
                )
            })
            .collect();
        let mut trained: Vec<f32> = picks
            .par_iter()
            .enumerate()
            .flat_map_iter(|(k, &j)| {
                shift_flip(
                    pool.image(labeled[j].0),
                    shift,
                    &mut item_rng(seed, stream::SEMI_WEAK, step, nu + k),
                )
            })
            .collect();
        trained.par_extend(unl.par_iter().enumerate().flat_map_iter(|(k, &item)| {
            augment_view(
                pool.image(item),
                &s.strong,
                &mut item_rng(seed, stream::SEMI_STRONG, step, k),
            )
        }));

        // Pseudo-labels from the weak views, without gradients or dropout.
        let weak = images::<B::InnerBackend>(weak_pool, nu, device);
        let flip = s.pseudo_label_flip;
        let weak_probs = host_values(match s.teacher {
            SemiTeacher::Model => teacher_probs(&state.model.valid(), weak, flip),
            SemiTeacher::Ema => teacher_probs(&state.ema, weak, flip),
        })?;
        let mut targets: Vec<i64> = picks.iter().map(|&j| labeled[j].1 as i64).collect();
        let mut weights: Vec<f32> = vec![1.0 / nl as f32; nl];
        let thresholds =
            class_thresholds(s.thresholds, s.threshold, &learned_count, pool_items.len());
        for (row, &item) in weak_probs.chunks(classes).zip(&unl) {
            let c = argmax(row);
            let confident = row[c] as f64 >= thresholds[c];
            if row[c] as f64 > s.threshold && state.learned[item] != c as u8 {
                if let Some(n) = learned_count.get_mut(state.learned[item] as usize) {
                    *n -= 1;
                }
                learned_count[c] += 1;
                state.learned[item] = c as u8;
            }
            targets.push(c as i64);
            weights.push(if confident {
                (s.unlabeled_weight / nu as f64) as f32
            } else {
                0.0
            });
            masked.0 += confident as usize;
            masked.1 += 1;
        }

        // One forward and backward pass over bought and strong views together.
        let n = nl + nu;
        let mut mask_rng = rng_for(seed, stream::SEMI_DROPOUT, step);
        let mask = keep_mask::<B>(
            n,
            state.model.embedding_dim(),
            cfg.model.dropout,
            &mut mask_rng,
            device,
        );
        let logits = state.model.forward(
            ClassifierInput::Images(images::<B>(trained, n, device)),
            Some(mask),
        );
        let targets = Tensor::<B, 2, Int>::from_data(TensorData::new(targets, [n, 1]), device);
        let nll = log_softmax(logits, 1).gather(1, targets).reshape([n]).neg();
        if selective {
            // Each pool image's loss against its pseudo-label, confident or not: how wrong the
            // strong view still is. One copy to the host per step, only with selection.
            let seen = host_values(nll.clone().inner().narrow(0, nl, nu))?;
            for (&item, l) in unl.iter().zip(seen) {
                state.losses[item] = l;
            }
        }
        let weights = Tensor::<B, 1>::from_data(TensorData::new(weights, [n]), device);
        let weighted = nll * weights;
        let loss = weighted.clone().sum();
        let inner = weighted.inner();
        pending.push(Tensor::cat(
            vec![
                inner.clone().narrow(0, 0, nl).sum(),
                inner.narrow(0, nl, nu).sum(),
            ],
            0,
        ));
        let lr = warmup_cosine(
            s.learning_rate,
            s.warmup_steps,
            s.min_lr_ratio,
            step,
            state.progress.total_steps,
        );
        let grads = GradientsParams::from_grads(loss.backward(), &state.model);
        state.model = optim.step(lr, state.model, grads);
        state.progress.step += 1;
        state.ema = if s.ema_decay > 0.0 {
            // The usual ramp: a young average follows the weights closely.
            let t = state.progress.step as f64;
            let decay = s.ema_decay.min((1.0 + t) / (10.0 + t));
            ema_update(state.ema, &state.model.valid(), decay)
        } else {
            state.model.valid()
        };
        bar.inc(nu as u64);

        // The time budget fixes the length once the step rate is known.
        let done_here = state.progress.step - start_step;
        if !state.progress.planned && done_here >= CALIBRATION_STEPS {
            let elapsed = session.elapsed().as_secs_f64();
            let per_step = elapsed / done_here as f64;
            let left = deadline_s.unwrap_or(f64::INFINITY) * BUDGET_FILL - elapsed;
            let affordable = state.progress.step + (left.max(0.0) / per_step) as u64;
            if affordable < state.progress.total_steps {
                log(
                    Some(&bar),
                    &format!(
                        "time budget: {affordable} of {} steps fit ({per_step:.2} s per step)",
                        state.progress.total_steps
                    ),
                );
                state.progress.total_steps = affordable.max(state.progress.step);
                bar.set_length(state.progress.total_steps * nu as u64);
            }
            state.progress.planned = true;
        }

        let last = state.progress.step >= state.progress.total_steps;
        if state.progress.step.is_multiple_of(s.eval_every) || last {
            let parts = host_values(Tensor::cat(std::mem::take(&mut pending), 0))?;
            let k = (parts.len() / 2).max(1) as f64;
            let labeled_loss = parts.iter().step_by(2).map(|&v| v as f64).sum::<f64>() / k;
            let unlabeled_loss = parts
                .iter()
                .skip(1)
                .step_by(2)
                .map(|&v| v as f64)
                .sum::<f64>()
                / k;
            let mask_rate = masked.0 as f64 / masked.1.max(1) as f64;
            masked = (0, 0);
            if !labeled_loss.is_finite() || !unlabeled_loss.is_finite() {
                bail!(
                    "the semi-supervised loss became non-finite at step {}: try a lower \
                     semi.learning_rate",
                    state.progress.step
                );
            }
            let (validation_accuracy, validation_loss) = if val.is_empty() {
                (f64::NAN, f64::NAN)
            } else {
                let scores = score(
                    &state.ema,
                    inputs,
                    Set::Pool,
                    &val_items,
                    cfg,
                    false,
                    0,
                    device,
                )?;
                accuracy_and_loss(&scores.probs, val.iter().map(|&(_, l)| l))
            };
            let eval = SemiEval {
                step: state.progress.step,
                validation_accuracy,
                validation_loss,
                labeled_loss,
                unlabeled_loss,
                mask_rate,
            };
            let better = match &state.progress.best {
                None => true,
                Some(_) if val.is_empty() => true,
                Some(b) => {
                    eval.validation_accuracy > b.validation_accuracy
                        || (eval.validation_accuracy == b.validation_accuracy
                            && eval.validation_loss < b.validation_loss)
                }
            };
            if better {
                state.progress.best = Some(eval.clone());
            }
            if better && s.keep == SemiKeep::BestValidation || last && s.keep == SemiKeep::Last {
                state.best = state.ema.clone();
            }
            let at = state.progress.step;
            tb.add_scalar("semi/loss_labeled", labeled_loss as f32, at)?;
            tb.add_scalar("semi/loss_pseudo", unlabeled_loss as f32, at)?;
            tb.add_scalar("semi/confident_share", mask_rate as f32, at)?;
            tb.add_scalar("semi/learning_rate", lr as f32, at)?;
            tb.add_scalar("semi/validation_accuracy", validation_accuracy as f32, at)?;
            tb.add_scalar("semi/validation_loss", validation_loss as f32, at)?;
            tb.flush()?;
            let validation = match (val.is_empty(), better) {
                (true, _) => "no validation labels (refit)".to_string(),
                (false, b) => format!(
                    "validation accuracy {:.2}%{}",
                    100.0 * validation_accuracy,
                    if b { " (best)" } else { "" }
                ),
            };
            log(
                Some(&bar),
                &format!(
                    "semi step {at}/{}: loss {labeled_loss:.3} (bought) + {unlabeled_loss:.3} \
                     (pseudo), {:.0}% of pool images confident, {validation}",
                    state.progress.total_steps,
                    100.0 * mask_rate,
                ),
            );
            state.progress.last = Some(eval);
        }
        let due = last_save.elapsed().as_secs_f64() >= s.checkpoint_minutes * 60.0;
        if due || last {
            state.progress.seconds = seconds_before + session.elapsed().as_secs_f64();
            state.progress.finished = last;
            state.optimizer = Some(record_to_bytes::<B, _>(optim.to_record())?);
            if selective {
                state.pass = pool_cycle.current().cloned();
            }
            save(&state)?;
            last_save = Instant::now();
        }
    }
    bar.finish_and_clear();
    state.progress.seconds = seconds_before + session.elapsed().as_secs_f64();
    state.progress.finished = true;
    Ok(state)
}

/// The teacher's class probabilities `[n, classes]` of the weak views `[n, 1, 28, 28]`; with
/// `mirror` (`semi.pseudo_label_flip`), the mean of each view's and its mirror image's, from one
/// forward pass over `[2n, 1, 28, 28]`.
fn teacher_probs<B: Backend>(
    teacher: &Classifier<B>,
    weak: Tensor<B, 4>,
    mirror: bool,
) -> Tensor<B, 2> {
    if !mirror {
        return softmax(teacher.forward(ClassifierInput::Images(weak), None), 1);
    }
    let n = weak.dims()[0];
    let both = Tensor::cat(vec![weak.clone(), weak.flip([3])], 0);
    let probs = softmax(teacher.forward(ClassifierInput::Images(both), None), 1);
    (probs.clone().narrow(0, 0, n) + probs.narrow(0, n, n)) * 0.5
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;

    #[test]
    fn mirrored_pseudo_labels_average_each_view_with_its_mirror() {
        let device = Default::default();
        let config = crate::models::EncoderConfig::default();
        let encoder = config.init::<Flex>(&device);
        let teacher: Classifier<Flex> =
            Classifier::new(Some(encoder), config.feature_dim(), 16, 10, &device);
        // Image 0 is left-right symmetric; image 1 is not.
        let side = 28;
        let mut px = vec![0.0f32; 2 * side * side];
        for r in 0..side {
            for c in 0..side {
                let mirrored_c = c.min(side - 1 - c);
                px[r * side + c] = (mirrored_c * 3 + r) as f32 / 100.0;
                px[side * side + r * side + c] = if c < 7 { 1.0 } else { (r as f32) / 50.0 };
            }
        }
        let weak = Tensor::<Flex, 4>::from_data(TensorData::new(px, [2, 1, side, side]), &device);
        let plain = host_values(teacher_probs(&teacher, weak.clone(), false)).unwrap();
        let mirror = host_values(teacher_probs(&teacher, weak.clone().flip([3]), false)).unwrap();
        let averaged = host_values(teacher_probs(&teacher, weak, true)).unwrap();
        assert_eq!(averaged.len(), 20);
        for k in 0..20 {
            let want = 0.5 * (plain[k] + mirror[k]);
            assert!((averaged[k] - want).abs() < 1e-5, "{k}: {averaged:?}");
        }
        for k in 0..10 {
            assert!(
                (averaged[k] - plain[k]).abs() < 1e-5,
                "the symmetric image moved"
            );
        }
        let moved: f32 = (10..20).map(|k| (averaged[k] - plain[k]).abs()).sum();
        assert!(moved > 1e-4, "the mirror changed nothing: {averaged:?}");
        assert!((averaged.iter().sum::<f32>() - 2.0).abs() < 1e-4);
    }

    #[test]
    fn folded_standardisation_computes_what_the_head_did() {
        let device = Default::default();
        let dim = 6;
        let head: Classifier<Flex> = Classifier::new(None, dim, 4, 3, &device);
        let mean: Vec<f32> = (0..dim).map(|i| i as f32 * 0.3 - 0.5).collect();
        let inv_std: Vec<f32> = (0..dim).map(|i| 0.5 + i as f32 * 0.2).collect();
        let x: Vec<f32> = (0..2 * dim).map(|i| (i as f32 * 0.37).sin()).collect();
        let scaled: Vec<f32> = x
            .iter()
            .enumerate()
            .map(|(k, v)| (v - mean[k % dim]) * inv_std[k % dim])
            .collect();
        let f = |v: Vec<f32>| {
            ClassifierInput::Features(Tensor::<Flex, 2>::from_data(
                TensorData::new(v, [2, dim]),
                &device,
            ))
        };
        let expected = host_values(head.forward(f(scaled), None)).unwrap();
        // The folded head with its encoder detached, fed raw features.
        let encoder = crate::models::EncoderConfig::default().init::<Flex>(&device);
        let mut folded = unfreeze(head, encoder, Some(&(mean, inv_std)), &device);
        folded.encoder = None;
        let got = host_values(folded.forward(f(x), None)).unwrap();
        for (a, b) in expected.iter().zip(&got) {
            assert!((a - b).abs() < 1e-4, "{expected:?} vs {got:?}");
        }
    }

    #[test]
    fn flex_thresholds_favour_hard_classes() {
        let fixed = class_thresholds(SemiThresholds::Fixed, 0.95, &[0, 5, 9], 100);
        assert_eq!(fixed, vec![0.95; 3]);
        // Nothing learnt yet: the fixed threshold.
        assert_eq!(
            class_thresholds(SemiThresholds::Flex, 0.95, &[0, 0, 0], 100),
            vec![0.95; 3]
        );
        // The most learnt class keeps the full threshold, the others less, by the convex warp.
        let t = class_thresholds(SemiThresholds::Flex, 0.95, &[50, 30, 0], 100);
        assert!((t[0] - 0.95).abs() < 1e-12);
        assert!((t[1] - 0.95 * 0.6 / 1.4).abs() < 1e-12);
        assert_eq!(t[2], 0.0);
    }

    #[test]
    fn cycles_visit_every_item_once_per_pass_and_resume_alike() {
        let items: Vec<usize> = (100..137).collect();
        let mut a = Cycle::new(&items, 7, 0);
        let first: Vec<usize> = a.take(0, 37, &[]);
        let mut sorted = first.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, items);
        let second = a.take(37, 37, &[]);
        assert_ne!(first, second, "each pass has its own order");
        // A fresh cycle (a resume) reading from the middle sees the same sequence.
        let mut b = Cycle::new(&items, 7, 0);
        assert_eq!(b.take(30, 20, &[]), [&first[30..], &second[..13]].concat());
        // The other salt is another order.
        assert_ne!(Cycle::new(&items, 7, 1).take(0, 37, &[]), first);
    }

    #[test]
    fn selective_cycles_spend_later_passes_on_the_highest_losses() {
        let items: Vec<usize> = (0..40).collect();
        // Loss grows with the item, except item 3 (never seen: first in line) and item 39 (low).
        let mut loss: Vec<f32> = (0..40).map(|i| i as f32).collect();
        loss[3] = f32::NAN;
        loss[39] = -1.0;
        let mut a = Cycle::selective(&items, 7, 1, 0.25);
        assert_eq!(a.later, 10);
        assert_eq!(a.positions(3.0), 60.0);
        // The first pass covers everything, in the plain cycle's order.
        let first = a.take(0, 40, &loss);
        assert_eq!(first, Cycle::new(&items, 7, 1).take(0, 40, &[]));
        // The second: the 10 hardest, shuffled.
        let second = a.take(40, 10, &loss);
        let mut sorted = second.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, [3, 30, 31, 32, 33, 34, 35, 36, 37, 38]);
        assert_ne!(second, sorted, "a pass is shuffled");
        // The third pass ranks by the losses when it begins.
        loss[0] = 100.0;
        let mut third = a.take(50, 10, &loss);
        third.sort_unstable();
        assert_eq!(third, [0, 3, 31, 32, 33, 34, 35, 36, 37, 38]);
        // A resume in the middle of a pass restores it and draws the same positions.
        let saved = a.current().cloned();
        let mut b = Cycle::selective(&items, 7, 1, 0.25);
        b.pass = saved;
        loss[5] = 1e9; // losses after the pass began do not change it
        assert_eq!(b.take(55, 10, &loss)[..5], a.take(55, 5, &loss)[..]);
    }
}
