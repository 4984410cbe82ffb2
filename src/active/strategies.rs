//! Acquisition strategies: which pool items to label next.
//!
//! Pure functions from model outputs (class probabilities, MC-dropout samples, embeddings) to
//! picks, in the style of baal's heuristics. No tensors and no I/O, so they are cheap to test and
//! the same code serves every backend.
//!
//! Determinism: every function gives the same answer for the same inputs (and RNG state), whatever
//! the number of threads. Ties are broken by the lower pool index, and parallel reductions either
//! work per item or use a total order, never a thread-dependent floating-point sum.
//!
//! Cost: the pool is up to 60,000 items, so the O(n·k·d) loops run on rayon and nothing keeps an
//! n×n matrix.

use std::cmp::Ordering;

use anyhow::{bail, ensure, Result};
use rand::seq::index;
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

/// Acquisition strategy, as chosen by `--strategy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Strategy {
    /// Uniformly random candidates: the baseline every other strategy must beat.
    Random,
    /// Smallest gap between the two most probable classes.
    Margin,
    /// Highest entropy of the predicted class distribution.
    Entropy,
    /// Lowest probability of the predicted class.
    LeastConfidence,
    /// Highest ratio of the second to the first class probability.
    Ratio,
    /// Highest mutual information between prediction and weights (MC dropout).
    Bald,
    /// Greedy k-center on embeddings (coreset): covers the pool, ignores uncertainty.
    Kcenter,
    /// The most margin-uncertain candidates, thinned by greedy k-center so the batch is diverse.
    MarginKcenter,
}

impl Strategy {
    /// The name used on the command line, in configs and in the ledger.
    pub fn name(self) -> &'static str {
        match self {
            Strategy::Random => "random",
            Strategy::Margin => "margin",
            Strategy::Entropy => "entropy",
            Strategy::LeastConfidence => "least-confidence",
            Strategy::Ratio => "ratio",
            Strategy::Bald => "bald",
            Strategy::Kcenter => "kcenter",
            Strategy::MarginKcenter => "margin-kcenter",
        }
    }

    /// Whether [`select`] needs [`PoolView::mc_probs`] (MC-dropout samples).
    pub fn needs_mc_samples(self) -> bool {
        matches!(self, Strategy::Bald)
    }

    /// Whether [`select`] needs [`PoolView::embeddings`].
    pub fn needs_embeddings(self) -> bool {
        matches!(self, Strategy::Kcenter | Strategy::MarginKcenter)
    }

    /// Whether [`select`] needs [`PoolView::probs`].
    pub fn needs_probs(self) -> bool {
        matches!(
            self,
            Strategy::Margin
                | Strategy::Entropy
                | Strategy::LeastConfidence
                | Strategy::Ratio
                | Strategy::MarginKcenter
        )
    }
}

/// Everything a strategy may look at, for the n items of the pool. Row-major slices.
#[derive(Debug, Clone, Copy)]
pub struct PoolView<'a> {
    /// Number of classes (row length of `probs` and of each MC sample).
    pub classes: usize,
    /// Mean predicted class probabilities, n * classes.
    pub probs: &'a [f32],
    /// MC-dropout samples (BALD): samples * n * classes, sample-major; empty if not computed.
    pub mc_probs: &'a [f32],
    /// Number of MC-dropout samples in `mc_probs`.
    pub mc_samples: usize,
    /// Embeddings (e.g. the classifier's penultimate layer), n * dim; empty if not computed.
    pub embeddings: &'a [f32],
    /// Embedding width.
    pub dim: usize,
    /// Pool items that may be bought (not labeled yet), ascending.
    pub candidates: &'a [usize],
    /// Pool items already labeled (k-center treats them as existing centers).
    pub labeled: &'a [usize],
}

/// One pick: pool index and the acquisition score to record in the ledger.
///
/// Higher scores are more wanted. Uncertainty strategies record the uncertainty, BALD the mutual
/// information, k-center the squared distance to the nearest center at the time of the pick
/// (`None` for the seed pick of an empty center set), margin-kcenter the margin uncertainty,
/// random `None`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Pick {
    /// Index into the pool.
    pub item: usize,
    /// Acquisition score, if the strategy has one.
    pub score: Option<f64>,
}

// ---------------------------------------------------------------------------------------------
// Uncertainty

/// The two largest values of a probability row (the second is 0 for a one-class row).
fn top_two(row: &[f32]) -> (f32, f32) {
    let (mut p1, mut p2) = (f32::NEG_INFINITY, f32::NEG_INFINITY);
    for &p in row {
        if p > p1 {
            p2 = p1;
            p1 = p;
        } else if p > p2 {
            p2 = p;
        }
    }
    (p1, if p2.is_finite() { p2 } else { 0.0 })
}

/// Entropy in nats, with 0 ln 0 = 0 (a one-hot row has entropy 0, not NaN).
fn entropy(row: impl Iterator<Item = f64>) -> f64 {
    row.filter(|&p| p > 0.0).map(|p| -p * p.ln()).sum()
}

/// Uncertainty of one probability row; see [`uncertainty`].
fn row_uncertainty(strategy: Strategy, row: &[f32]) -> f32 {
    match strategy {
        Strategy::Margin | Strategy::MarginKcenter => {
            let (p1, p2) = top_two(row);
            1.0 - (p1 - p2)
        }
        Strategy::Entropy => entropy(row.iter().map(|&p| p as f64)) as f32,
        Strategy::LeastConfidence => 1.0 - top_two(row).0,
        Strategy::Ratio => {
            let (p1, p2) = top_two(row);
            // A zero top probability only comes from an all-zero row: call it maximally unsure.
            if p1 > 0.0 {
                p2 / p1
            } else {
                1.0
            }
        }
        Strategy::Random | Strategy::Bald | Strategy::Kcenter => {
            panic!("{} is not a probability-based uncertainty", strategy.name())
        }
    }
}

/// Uncertainty scores (higher = less sure), one per row of `probs` (n * classes).
///
/// margin = 1 - (p1 - p2); entropy = -Σ p ln p; least-confidence = 1 - p1; ratio = p2 / p1, where
/// p1 >= p2 are the two largest probabilities of the row. `MarginKcenter` scores as margin.
///
/// # Panics
/// For `Random`, `Bald` and `Kcenter`, which have no per-row uncertainty, and if `classes` is 0.
pub fn uncertainty(strategy: Strategy, probs: &[f32], classes: usize) -> Vec<f32> {
    assert!(classes > 0, "classes must be positive");
    probs
        .par_chunks(classes)
        .map(|row| row_uncertainty(strategy, row))
        .collect()
}

/// BALD mutual information per item: H(mean_s p_s) - mean_s H(p_s).
///
/// `mc_probs` holds `samples` MC-dropout predictions of the whole pool, sample-major
/// (samples * n * classes). High when the samples are each confident but disagree (epistemic
/// uncertainty), near 0 when they agree, even if they agree on being unsure (aleatoric).
///
/// # Panics
/// If `samples` or `classes` is 0, or the length is not a multiple of `samples * classes`.
pub fn bald(mc_probs: &[f32], samples: usize, classes: usize) -> Vec<f32> {
    assert!(
        samples > 0 && classes > 0,
        "samples and classes must be positive"
    );
    assert!(
        mc_probs.len().is_multiple_of(samples * classes),
        "mc_probs length {} is not a multiple of samples * classes = {}",
        mc_probs.len(),
        samples * classes
    );
    let n = mc_probs.len() / (samples * classes);
    (0..n)
        .into_par_iter()
        .map(|i| {
            // f64 because the result is a small difference of two entropies of similar size.
            let mut mean = vec![0f64; classes];
            let mut mean_entropy = 0f64;
            for s in 0..samples {
                let row = &mc_probs[(s * n + i) * classes..][..classes];
                for (m, &p) in mean.iter_mut().zip(row) {
                    *m += p as f64;
                }
                mean_entropy += entropy(row.iter().map(|&p| p as f64));
            }
            mean.iter_mut().for_each(|m| *m /= samples as f64);
            let mi = entropy(mean.iter().copied()) - mean_entropy / samples as f64;
            // Jensen makes it >= 0; rounding can leave a tiny negative.
            mi.max(0.0) as f32
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Distances

/// Dot product with 8 independent accumulators: without them LLVM keeps the float sum sequential
/// (no fast-math), with them it vectorizes.
#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// Squared Euclidean distance, vectorized like [`dot`].
#[inline]
fn sq_dist(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| (x - y) * (x - y))
        .sum();
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            let d = x[l] - y[l];
            acc[l] += d * d;
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// Row `i` of a row-major matrix with `dim` columns.
#[inline]
fn row(m: &[f32], dim: usize, i: usize) -> &[f32] {
    &m[i * dim..(i + 1) * dim]
}

/// `(score, item)` ordering for "best first": higher score, then lower item. A total order, so
/// parallel max-reductions and sorts are deterministic.
fn better(a: (f32, usize), b: (f32, usize)) -> Ordering {
    b.0.total_cmp(&a.0).then(a.1.cmp(&b.1))
}

// ---------------------------------------------------------------------------------------------
// k-center

/// Greedy k-center (coreset): picks `k` of `candidates`, each the candidate farthest (squared
/// Euclidean) from its nearest center, where the centers are the `labeled` items plus the picks
/// so far.
///
/// With no labeled items the first pick is the candidate nearest the mean of the candidates
/// (deterministic, and a central point is a better seed than an outlier); its score is `None`.
/// Other scores are the squared distance to the nearest center at the time of the pick.
///
/// Keeps one min-distance per candidate and updates it with each new center, so a pick costs
/// O(n·d) on rayon; the initial pass against the labeled items costs O(n·|labeled|·d).
/// Returns `min(k, candidates.len())` picks.
///
/// # Panics
/// If `dim` is 0 or an index is outside `embeddings`.
pub fn kcenter_greedy(
    embeddings: &[f32],
    dim: usize,
    candidates: &[usize],
    labeled: &[usize],
    k: usize,
) -> Vec<Pick> {
    assert!(dim > 0, "dim must be positive");
    let k = k.min(candidates.len());
    if k == 0 {
        return Vec::new();
    }
    // Distance of each candidate to its nearest center; NEG_INFINITY marks "already picked", so a
    // picked item never wins again even when every remaining distance is 0 (duplicates).
    let mut min_dist: Vec<f32> = candidates
        .par_iter()
        .map(|&c| {
            let x = row(embeddings, dim, c);
            labeled
                .iter()
                .map(|&l| sq_dist(x, row(embeddings, dim, l)))
                .fold(f32::INFINITY, f32::min)
        })
        .collect();

    let mut picks = Vec::with_capacity(k);
    // `next`: position (in `candidates`) of the latest pick, still to be folded into `min_dist`.
    let mut next = if labeled.is_empty() {
        // Mean in f64, summed in candidate order: deterministic whatever the thread count.
        let mut mean = vec![0f64; dim];
        for &c in candidates {
            for (m, &v) in mean.iter_mut().zip(row(embeddings, dim, c)) {
                *m += v as f64;
            }
        }
        let mean: Vec<f32> = mean
            .iter()
            .map(|m| (m / candidates.len() as f64) as f32)
            .collect();
        let (pos, _) = candidates
            .par_iter()
            .enumerate()
            .map(|(pos, &c)| (pos, (-sq_dist(row(embeddings, dim, c), &mean), c)))
            .min_by(|a, b| better(a.1, b.1))
            .expect("candidates is not empty");
        picks.push(Pick {
            item: candidates[pos],
            score: None,
        });
        pos
    } else {
        let pos = argmax(&min_dist, candidates);
        picks.push(Pick {
            item: candidates[pos],
            score: Some(min_dist[pos] as f64),
        });
        pos
    };

    while picks.len() < k {
        // Fold the new center into the min-distances and find the next farthest candidate in the
        // same parallel pass (one read of the embeddings per pick).
        let center = row(embeddings, dim, candidates[next]);
        min_dist[next] = f32::NEG_INFINITY;
        let (pos, _) = min_dist
            .par_iter_mut()
            .zip(candidates.par_iter())
            .enumerate()
            .map(|(pos, (d, &c))| {
                if *d != f32::NEG_INFINITY {
                    *d = d.min(sq_dist(row(embeddings, dim, c), center));
                }
                (pos, (*d, c))
            })
            .min_by(|a, b| better(a.1, b.1))
            .expect("candidates is not empty");
        picks.push(Pick {
            item: candidates[pos],
            score: Some(min_dist[pos] as f64),
        });
        next = pos;
    }
    picks
}

/// Position of the largest `min_dist` (ties: lower item).
fn argmax(min_dist: &[f32], candidates: &[usize]) -> usize {
    min_dist
        .par_iter()
        .zip(candidates.par_iter())
        .enumerate()
        .min_by(|a, b| better((*a.1 .0, *a.1 .1), (*b.1 .0, *b.1 .1)))
        .map(|(pos, _)| pos)
        .expect("candidates is not empty")
}

// ---------------------------------------------------------------------------------------------
// select

/// Checks that `view` holds what `strategy` needs, with lengths that agree on the pool size, and
/// that `k` candidates can be picked.
fn check_view(strategy: Strategy, view: &PoolView, k: usize) -> Result<()> {
    let cands = view.candidates;
    ensure!(
        k <= cands.len(),
        "cannot pick {k} items from {} candidates",
        cands.len()
    );
    // n from the probabilities when present (they are always computed for evaluation), else from
    // whichever input the strategy needs.
    let mut n: Option<usize> = None;
    let mut agree = |what: &str, len: usize, row: usize| -> Result<()> {
        ensure!(row > 0, "{what}: row length is 0");
        ensure!(
            len.is_multiple_of(row),
            "{what}: length {len} is not a multiple of {row}"
        );
        let m = len / row;
        match n {
            Some(n) => ensure!(m == n, "{what} covers {m} items, other inputs {n}"),
            None => n = Some(m),
        }
        Ok(())
    };
    if strategy.needs_probs() || !view.probs.is_empty() {
        ensure!(
            !view.probs.is_empty(),
            "{} needs class probabilities",
            strategy.name()
        );
        agree("probs", view.probs.len(), view.classes)?;
    }
    if strategy.needs_mc_samples() {
        ensure!(
            !view.mc_probs.is_empty() && view.mc_samples > 0,
            "{} needs MC-dropout samples",
            strategy.name()
        );
        agree(
            "mc_probs",
            view.mc_probs.len(),
            view.mc_samples * view.classes,
        )?;
    }
    if strategy.needs_embeddings() {
        ensure!(
            !view.embeddings.is_empty(),
            "{} needs embeddings",
            strategy.name()
        );
        agree("embeddings", view.embeddings.len(), view.dim)?;
    }
    // Candidates must be distinct and disjoint from the labeled set: an overlap means the caller's
    // bookkeeping is wrong, and buying a label twice would waste budget silently.
    let max = cands.iter().chain(view.labeled).copied().max().unwrap_or(0);
    if let Some(n) = n {
        ensure!(
            (cands.is_empty() && view.labeled.is_empty()) || max < n,
            "pool index {max} out of range for {n} items"
        );
    }
    let mut seen = vec![0u8; max + 1];
    for &l in view.labeled {
        seen[l] = 1;
    }
    for &c in cands {
        match seen[c] {
            0 => seen[c] = 2,
            1 => bail!("candidate {c} is already labeled"),
            _ => bail!("candidate {c} is listed twice"),
        }
    }
    Ok(())
}

/// The `k` candidates with the highest `score(item)`, best first (ties: lower index).
fn top_k(
    candidates: &[usize],
    k: usize,
    score: impl Fn(usize) -> f32 + Sync,
) -> Result<Vec<(f32, usize)>> {
    let mut scored: Vec<(f32, usize)> = candidates.par_iter().map(|&c| (score(c), c)).collect();
    if let Some(&(_, c)) = scored.iter().find(|(s, _)| s.is_nan()) {
        // A diverged model gives NaN; ranking NaN would pick arbitrary items without a warning.
        bail!("acquisition score of item {c} is NaN");
    }
    if k < scored.len() && k > 0 {
        scored.select_nth_unstable_by(k - 1, |a, b| better(*a, *b));
    }
    scored.truncate(k);
    scored.sort_unstable_by(|a, b| better(*a, *b));
    Ok(scored)
}

/// Chooses `k` items among `view.candidates` with `strategy`.
///
/// Random draws from `rng`; every other strategy is deterministic for given inputs, ties broken by
/// the lower pool index. margin-kcenter takes the `candidate_factor * k` candidates with the
/// highest margin uncertainty, then runs greedy k-center among them with the labeled items as
/// centers, so the batch is uncertain *and* diverse instead of k near-duplicates; its scores are
/// the margin uncertainties.
///
/// Errors if `k > candidates.len()`, if a needed input (probs, mc_probs, embeddings) is empty or
/// its length disagrees with the others, if an index is out of range, a candidate is listed twice
/// or already labeled, or a score is NaN.
pub fn select(
    strategy: Strategy,
    view: &PoolView,
    k: usize,
    candidate_factor: usize,
    rng: &mut ChaCha8Rng,
) -> Result<Vec<Pick>> {
    check_view(strategy, view, k)?;
    let cands = view.candidates;
    let picks = match strategy {
        Strategy::Random => index::sample(rng, cands.len(), k)
            .into_iter()
            .map(|i| Pick {
                item: cands[i],
                score: None,
            })
            .collect(),
        Strategy::Margin | Strategy::Entropy | Strategy::LeastConfidence | Strategy::Ratio => {
            let c = view.classes;
            top_k(cands, k, |i| {
                row_uncertainty(strategy, &view.probs[i * c..(i + 1) * c])
            })?
            .into_iter()
            .map(|(s, item)| Pick {
                item,
                score: Some(s as f64),
            })
            .collect()
        }
        Strategy::Bald => {
            let mi = bald(view.mc_probs, view.mc_samples, view.classes);
            top_k(cands, k, |i| mi[i])?
                .into_iter()
                .map(|(s, item)| Pick {
                    item,
                    score: Some(s as f64),
                })
                .collect()
        }
        Strategy::Kcenter => kcenter_greedy(view.embeddings, view.dim, cands, view.labeled, k),
        Strategy::MarginKcenter => {
            let c = view.classes;
            let m = candidate_factor.max(1).saturating_mul(k).min(cands.len());
            let top = top_k(cands, m, |i| {
                row_uncertainty(Strategy::Margin, &view.probs[i * c..(i + 1) * c])
            })?;
            // k-center's tie-breaking is by item, but sort anyway so its seed mean is summed in a
            // fixed order.
            let mut shortlist: Vec<(usize, f32)> = top.iter().map(|&(s, i)| (i, s)).collect();
            shortlist.sort_unstable_by_key(|&(i, _)| i);
            let items: Vec<usize> = shortlist.iter().map(|&(i, _)| i).collect();
            kcenter_greedy(view.embeddings, view.dim, &items, view.labeled, k)
                .into_iter()
                .map(|p| {
                    let pos = items
                        .binary_search(&p.item)
                        .expect("pick is in the shortlist");
                    Pick {
                        item: p.item,
                        score: Some(shortlist[pos].1 as f64),
                    }
                })
                .collect()
        }
    };
    Ok(picks)
}

// ---------------------------------------------------------------------------------------------
// Cold start: k-means + TypiClust

/// Most members of one cluster that [`kmeans_typical`] compares with each other: typicality is a
/// kNN density, so a random subsample estimates it well and keeps the cost at O(2000²·d).
const TYPICALITY_SAMPLE: usize = 2_000;

/// Label-free cold start (TypiClust): k-means on `embeddings` (n * dim), then from each cluster its
/// most typical point.
///
/// k-means++ initialisation draws from `rng`; Lloyd iterations run `iters` times or until the
/// assignments stop changing (a cluster that empties keeps its old centroid). Typicality is the
/// inverse of the mean Euclidean distance to the `knn` nearest other members of the cluster
/// (TypiClust's density), measured within a random subsample of at most 2,000 members for big
/// clusters; the member with the highest typicality (ties: lower index) is picked, and its
/// typicality is the score. A singleton cluster's member has typicality 0.
///
/// Returns exactly `k` distinct items: if some clusters end up empty (e.g. duplicate points), the
/// remaining items closest to their centroid fill the gap (ties: lower index). Deterministic for a
/// given `rng` state. Picks come in cluster order, then the fill.
///
/// Errors if `dim`, `k` or `knn` is 0, the length is not a multiple of `dim`, `k > n`, or a value
/// is not finite.
pub fn kmeans_typical(
    embeddings: &[f32],
    dim: usize,
    k: usize,
    iters: usize,
    knn: usize,
    rng: &mut ChaCha8Rng,
) -> Result<Vec<Pick>> {
    ensure!(dim > 0, "dim must be positive");
    ensure!(
        embeddings.len().is_multiple_of(dim),
        "embeddings length {} is not a multiple of dim {dim}",
        embeddings.len()
    );
    let n = embeddings.len() / dim;
    ensure!(k > 0 && k <= n, "cannot pick {k} items from {n}");
    ensure!(knn > 0, "knn must be positive");
    ensure!(
        embeddings.par_iter().all(|v| v.is_finite()),
        "embeddings contain NaN or infinity"
    );

    let mut centroids = kmeans_pp(embeddings, dim, k, rng);
    let (mut assign, mut dist) = assign_nearest(embeddings, dim, &centroids);
    for _ in 0..iters {
        update_centroids(embeddings, dim, &assign, &mut centroids);
        let (new_assign, new_dist) = assign_nearest(embeddings, dim, &centroids);
        let changed = new_assign != assign;
        assign = new_assign;
        dist = new_dist;
        if !changed {
            break;
        }
    }

    // Subsamples are drawn sequentially, cluster by cluster, so the RNG use is deterministic; the
    // densities are then computed in parallel.
    let clusters = members(&assign, k);
    let samples: Vec<Vec<usize>> = clusters
        .iter()
        .map(|m| {
            if m.len() > TYPICALITY_SAMPLE {
                let mut s: Vec<usize> = index::sample(rng, m.len(), TYPICALITY_SAMPLE)
                    .into_iter()
                    .map(|i| m[i])
                    .collect();
                s.sort_unstable();
                s
            } else {
                m.clone()
            }
        })
        .collect();
    let mut picks: Vec<Pick> = samples
        .par_iter()
        .filter(|s| !s.is_empty())
        .map(|s| {
            let (typ, item) = s
                .par_iter()
                .map(|&i| (typicality(embeddings, dim, i, s, knn), i))
                .min_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)))
                .expect("cluster is not empty");
            Pick {
                item,
                score: Some(typ),
            }
        })
        .collect();

    if picks.len() < k {
        let mut taken = vec![false; n];
        for p in &picks {
            taken[p.item] = true;
        }
        let mut rest: Vec<usize> = (0..n).filter(|&i| !taken[i]).collect();
        rest.sort_unstable_by(|&a, &b| dist[a].total_cmp(&dist[b]).then(a.cmp(&b)));
        let fill = k - picks.len();
        picks.extend(rest[..fill].iter().map(|&i| Pick {
            item: i,
            score: Some(typicality(
                embeddings,
                dim,
                i,
                &samples[assign[i] as usize],
                knn,
            )),
        }));
    }
    Ok(picks)
}

/// TypiClust typicality of `item`: 1 / mean Euclidean distance to its `knn` nearest neighbours
/// among `sample` (itself excluded). 0 with no neighbour; capped for exact duplicates so the
/// score stays finite (the ledger is JSON).
fn typicality(embeddings: &[f32], dim: usize, item: usize, sample: &[usize], knn: usize) -> f64 {
    let x = row(embeddings, dim, item);
    let mut d: Vec<f32> = sample
        .iter()
        .filter(|&&j| j != item)
        .map(|&j| sq_dist(x, row(embeddings, dim, j)))
        .collect();
    if d.is_empty() {
        return 0.0;
    }
    let m = knn.min(d.len());
    if m < d.len() {
        d.select_nth_unstable_by(m - 1, f32::total_cmp);
    }
    let mean = d[..m].iter().map(|&v| (v as f64).sqrt()).sum::<f64>() / m as f64;
    1.0 / mean.max(1e-12)
}

/// k-means++ seeding: each new centroid is a point drawn with probability proportional to its
/// squared distance to the nearest centroid so far. Returns k * dim values.
fn kmeans_pp(embeddings: &[f32], dim: usize, k: usize, rng: &mut ChaCha8Rng) -> Vec<f32> {
    let n = embeddings.len() / dim;
    let mut centroids = Vec::with_capacity(k * dim);
    let first = rng.random_range(0..n);
    centroids.extend_from_slice(row(embeddings, dim, first));
    let mut d2: Vec<f32> = (0..n)
        .into_par_iter()
        .map(|i| sq_dist(row(embeddings, dim, i), row(embeddings, dim, first)))
        .collect();
    for _ in 1..k {
        // Sequential f64 sum: the draw must not depend on the thread count.
        let total: f64 = d2.iter().map(|&v| v as f64).sum();
        let pick = if total > 0.0 {
            let r = rng.random::<f64>() * total;
            let mut cum = 0f64;
            let mut pick = None;
            let mut last_positive = 0;
            for (i, &v) in d2.iter().enumerate() {
                if v > 0.0 {
                    last_positive = i;
                    cum += v as f64;
                    if cum > r {
                        pick = Some(i);
                        break;
                    }
                }
            }
            // Rounding can leave cum <= r at the end; the last positive point is the right answer.
            pick.unwrap_or(last_positive)
        } else {
            // Every point coincides with a centroid: any point is as good as another.
            rng.random_range(0..n)
        };
        let c = row(embeddings, dim, pick);
        centroids.extend_from_slice(c);
        d2.par_iter_mut().enumerate().for_each(|(i, d)| {
            *d = d.min(sq_dist(row(embeddings, dim, i), c));
        });
    }
    centroids
}

/// Nearest centroid of every point (ties: lower centroid) and the squared distance to it.
///
/// Uses |x - c|² = |x|² - 2 x·c + |c|²: the argmin only needs the dot products, half the work of
/// a direct distance, and this is the O(n·k·d) hot loop of k-means.
fn assign_nearest(embeddings: &[f32], dim: usize, centroids: &[f32]) -> (Vec<u32>, Vec<f32>) {
    let k = centroids.len() / dim;
    let norms: Vec<f32> = centroids.chunks_exact(dim).map(|c| dot(c, c)).collect();
    embeddings
        .par_chunks_exact(dim)
        .with_min_len(64)
        .map(|x| {
            let mut best = (f32::INFINITY, 0u32);
            for (j, c) in centroids.chunks_exact(dim).enumerate() {
                let v = norms[j] - 2.0 * dot(x, c);
                if v < best.0 {
                    best = (v, j as u32);
                }
            }
            debug_assert!(best.1 < k as u32);
            (best.1, (best.0 + dot(x, x)).max(0.0))
        })
        .unzip()
}

/// Members of each of the `k` clusters, ascending.
fn members(assign: &[u32], k: usize) -> Vec<Vec<usize>> {
    let mut m = vec![Vec::new(); k];
    for (i, &a) in assign.iter().enumerate() {
        m[a as usize].push(i);
    }
    m
}

/// Lloyd update: each centroid moves to the mean of its members (summed in f64, in index order,
/// so the result does not depend on threads); an empty cluster keeps its centroid.
fn update_centroids(embeddings: &[f32], dim: usize, assign: &[u32], centroids: &mut [f32]) {
    let k = centroids.len() / dim;
    let clusters = members(assign, k);
    centroids
        .par_chunks_exact_mut(dim)
        .zip(clusters.par_iter())
        .filter(|(_, m)| !m.is_empty())
        .for_each(|(c, m)| {
            let mut sum = vec![0f64; dim];
            for &i in m {
                for (s, &v) in sum.iter_mut().zip(row(embeddings, dim, i)) {
                    *s += v as f64;
                }
            }
            for (c, s) in c.iter_mut().zip(&sum) {
                *c = (s / m.len() as f64) as f32;
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_distr::{Distribution, StandardNormal};

    fn rng(seed: u64) -> ChaCha8Rng {
        ChaCha8Rng::seed_from_u64(seed)
    }

    fn close(a: f32, b: f32) -> bool {
        (a - b).abs() < 1e-5
    }

    /// Points around `centers` (each `per` points, Gaussian with std `spread`), item i belongs to
    /// blob i / per.
    fn blobs(centers: &[Vec<f32>], per: usize, spread: f32, seed: u64) -> Vec<f32> {
        let mut r = rng(seed);
        let mut out = Vec::new();
        for c in centers {
            for _ in 0..per {
                for &v in c {
                    let z: f32 = StandardNormal.sample(&mut r);
                    out.push(v + spread * z);
                }
            }
        }
        out
    }

    fn random_probs(n: usize, classes: usize, r: &mut ChaCha8Rng) -> Vec<f32> {
        let mut p = Vec::with_capacity(n * classes);
        for _ in 0..n {
            let row: Vec<f32> = (0..classes).map(|_| r.random::<f32>().powi(3)).collect();
            let s: f32 = row.iter().sum();
            p.extend(row.iter().map(|v| v / s));
        }
        p
    }

    #[test]
    fn names_match_serde_and_clap() {
        use clap::ValueEnum;
        for s in Strategy::value_variants() {
            let json = serde_json::to_string(s).unwrap();
            assert_eq!(json, format!("\"{}\"", s.name()));
            assert_eq!(s.to_possible_value().unwrap().get_name(), s.name());
            assert_eq!(Strategy::from_str(s.name(), false).unwrap(), *s);
        }
        assert!(Strategy::Bald.needs_mc_samples() && !Strategy::Margin.needs_mc_samples());
        assert!(Strategy::Kcenter.needs_embeddings() && Strategy::MarginKcenter.needs_embeddings());
        assert!(!Strategy::Entropy.needs_embeddings());
    }

    #[test]
    fn uncertainty_values_on_hand_made_rows() {
        let probs = [
            0.25, 0.25, 0.25, 0.25, // uniform: most uncertain
            0.5, 0.3, 0.2, 0.0, // in between
            0.0, 1.0, 0.0, 0.0, // one-hot: certain
        ];
        let m = uncertainty(Strategy::Margin, &probs, 4);
        let e = uncertainty(Strategy::Entropy, &probs, 4);
        let lc = uncertainty(Strategy::LeastConfidence, &probs, 4);
        let r = uncertainty(Strategy::Ratio, &probs, 4);
        let mid_entropy = -(0.5f32 * 0.5f32.ln() + 0.3 * 0.3f32.ln() + 0.2 * 0.2f32.ln());
        for (got, want) in [
            (&m, [1.0, 0.8, 0.0]),
            (&e, [4f32.ln(), mid_entropy, 0.0]),
            (&lc, [0.75, 0.5, 0.0]),
            (&r, [1.0, 0.6, 0.0]),
        ] {
            assert_eq!(got.len(), 3);
            for (g, w) in got.iter().zip(want) {
                assert!(close(*g, w), "{got:?} vs {want:?}");
            }
            assert!(got[0] > got[1] && got[1] > got[2]);
        }
        // MarginKcenter ranks by margin.
        assert_eq!(uncertainty(Strategy::MarginKcenter, &probs, 4), m);
    }

    #[test]
    fn uncertainty_strategies_pick_the_least_sure() {
        let probs = [
            0.9, 0.1, 0.0, // item 0: sure
            0.4, 0.35, 0.25, // item 1: unsure
            0.6, 0.4, 0.0, // item 2
            0.34, 0.33, 0.33, // item 3: labeled, must never come back
        ];
        let view = PoolView {
            classes: 3,
            probs: &probs,
            mc_probs: &[],
            mc_samples: 0,
            embeddings: &[],
            dim: 0,
            candidates: &[0, 1, 2],
            labeled: &[3],
        };
        for s in [
            Strategy::Margin,
            Strategy::Entropy,
            Strategy::LeastConfidence,
            Strategy::Ratio,
        ] {
            let picks = select(s, &view, 2, 1, &mut rng(0)).unwrap();
            assert_eq!(picks.len(), 2);
            assert_eq!(picks[0].item, 1, "{s:?}");
            assert!(picks[0].score.unwrap() >= picks[1].score.unwrap());
        }
    }

    #[test]
    fn bald_is_zero_when_samples_agree_and_positive_when_they_disagree() {
        // 2 samples, 2 items, 3 classes, sample-major.
        let mc = [
            // sample 0
            0.7, 0.2, 0.1, // item 0
            1.0, 0.0, 0.0, // item 1
            // sample 1
            0.7, 0.2, 0.1, // item 0: agrees
            0.0, 1.0, 0.0, // item 1: confident, disagrees
        ];
        let b = bald(&mc, 2, 3);
        assert_eq!(b.len(), 2);
        assert!(b[0].abs() < 1e-6, "{b:?}");
        assert!(close(b[1], 2f32.ln()), "{b:?}");
        // Agreeing on "unsure" is aleatoric: still 0.
        let unsure = [0.5, 0.5, 0.5, 0.5];
        assert!(bald(&unsure, 2, 2)[0].abs() < 1e-6);
    }

    /// A random pool with every input filled, items `labeled` already bought.
    struct Pool {
        probs: Vec<f32>,
        mc: Vec<f32>,
        emb: Vec<f32>,
        candidates: Vec<usize>,
        labeled: Vec<usize>,
    }

    const N: usize = 300;
    const C: usize = 5;
    const S: usize = 4;
    const D: usize = 6;

    fn pool() -> Pool {
        let mut r = rng(42);
        let probs = random_probs(N, C, &mut r);
        let mc = random_probs(N * S, C, &mut r);
        let emb: Vec<f32> = (0..N * D).map(|_| StandardNormal.sample(&mut r)).collect();
        let labeled: Vec<usize> = (0..N).filter(|i| i % 7 == 3).collect();
        let candidates = (0..N).filter(|i| i % 7 != 3).collect();
        Pool {
            probs,
            mc,
            emb,
            candidates,
            labeled,
        }
    }

    fn view(p: &Pool) -> PoolView<'_> {
        PoolView {
            classes: C,
            probs: &p.probs,
            mc_probs: &p.mc,
            mc_samples: S,
            embeddings: &p.emb,
            dim: D,
            candidates: &p.candidates,
            labeled: &p.labeled,
        }
    }

    #[test]
    fn select_returns_k_distinct_unlabeled_candidates() {
        use clap::ValueEnum;
        let p = pool();
        let v = view(&p);
        for &s in Strategy::value_variants() {
            for k in [0, 1, 17, p.candidates.len()] {
                let picks = select(s, &v, k, 3, &mut rng(1)).unwrap();
                assert_eq!(picks.len(), k, "{s:?} k={k}");
                let mut items: Vec<usize> = picks.iter().map(|p| p.item).collect();
                assert!(items.iter().all(|i| p.candidates.contains(i)), "{s:?}");
                assert!(items.iter().all(|i| !p.labeled.contains(i)), "{s:?}");
                items.sort_unstable();
                items.dedup();
                assert_eq!(items.len(), k, "{s:?} returned duplicates");
                if k > 0 {
                    let unscored = picks.iter().all(|p| p.score.is_none());
                    assert_eq!(s == Strategy::Random, unscored, "{s:?}");
                }
                // Deterministic strategies give the same answer with another rng.
                if s != Strategy::Random {
                    assert_eq!(picks, select(s, &v, k, 3, &mut rng(2)).unwrap(), "{s:?}");
                }
            }
            let err = select(s, &v, p.candidates.len() + 1, 3, &mut rng(1));
            assert!(err.is_err(), "{s:?} accepted k > candidates");
        }
    }

    #[test]
    fn select_rejects_missing_or_inconsistent_inputs() {
        let p = pool();
        let v = view(&p);
        let no_emb = PoolView {
            embeddings: &[],
            ..v
        };
        assert!(select(Strategy::Kcenter, &no_emb, 3, 2, &mut rng(0)).is_err());
        assert!(select(Strategy::MarginKcenter, &no_emb, 3, 2, &mut rng(0)).is_err());
        assert!(select(Strategy::Margin, &no_emb, 3, 2, &mut rng(0)).is_ok());
        let no_mc = PoolView { mc_probs: &[], ..v };
        assert!(select(Strategy::Bald, &no_mc, 3, 2, &mut rng(0)).is_err());
        let short_mc = PoolView {
            mc_probs: &p.mc[..p.mc.len() - C],
            ..v
        };
        assert!(select(Strategy::Bald, &short_mc, 3, 2, &mut rng(0)).is_err());
        let short_emb = PoolView {
            embeddings: &p.emb[..p.emb.len() - D],
            ..v
        };
        assert!(select(Strategy::Kcenter, &short_emb, 3, 2, &mut rng(0)).is_err());
        let overlap = [0usize, 3];
        let bad = PoolView {
            candidates: &overlap,
            ..v
        };
        assert!(select(Strategy::Random, &bad, 1, 2, &mut rng(0)).is_err());
        let twice = [0usize, 0];
        let bad = PoolView {
            candidates: &twice,
            ..v
        };
        assert!(select(Strategy::Margin, &bad, 1, 2, &mut rng(0)).is_err());
        let out_of_range = [N];
        let bad = PoolView {
            candidates: &out_of_range,
            ..v
        };
        assert!(select(Strategy::Margin, &bad, 1, 2, &mut rng(0)).is_err());
    }

    #[test]
    fn random_is_reproducible_per_seed() {
        let p = pool();
        let v = view(&p);
        let a = select(Strategy::Random, &v, 20, 1, &mut rng(5)).unwrap();
        assert_eq!(a, select(Strategy::Random, &v, 20, 1, &mut rng(5)).unwrap());
        assert_ne!(a, select(Strategy::Random, &v, 20, 1, &mut rng(6)).unwrap());
    }

    /// Four tight 2-D clusters of 10 points at the corners of a big square; item i is in cluster
    /// i / 10.
    fn four_clusters() -> Vec<f32> {
        let corners = [
            vec![0.0, 0.0],
            vec![100.0, 0.0],
            vec![0.0, 100.0],
            vec![100.0, 100.0],
        ];
        blobs(&corners, 10, 1.0, 9)
    }

    #[test]
    fn kcenter_covers_every_cluster_before_repeating_one() {
        let emb = four_clusters();
        let all: Vec<usize> = (0..40).collect();
        let picks = kcenter_greedy(&emb, 2, &all, &[], 8);
        assert_eq!(picks.len(), 8);
        let mut first: Vec<usize> = picks[..4].iter().map(|p| p.item / 10).collect();
        first.sort_unstable();
        assert_eq!(first, [0, 1, 2, 3]);
        assert_eq!(picks[0].score, None);
        // Scores (distance to nearest center when picked) never increase, and drop sharply once
        // every cluster holds a center.
        let scores: Vec<f64> = picks[1..].iter().map(|p| p.score.unwrap()).collect();
        assert!(scores.windows(2).all(|w| w[0] >= w[1]), "{scores:?}");
        assert!(scores[2] > 1000.0 && scores[3] < 100.0, "{scores:?}");

        // Labeled items are centers already: a labeled point in cluster 0 sends the picks elsewhere.
        let candidates: Vec<usize> = (1..40).collect();
        let picks = kcenter_greedy(&emb, 2, &candidates, &[0], 3);
        let mut clusters: Vec<usize> = picks.iter().map(|p| p.item / 10).collect();
        clusters.sort_unstable();
        assert_eq!(clusters, [1, 2, 3]);
        assert!(picks.iter().all(|p| p.score.unwrap() > 1000.0));
    }

    #[test]
    fn kcenter_handles_exact_duplicates() {
        let emb = vec![1.0f32; 10 * 3];
        let all: Vec<usize> = (0..10).collect();
        let picks = kcenter_greedy(&emb, 3, &all, &[], 10);
        let items: Vec<usize> = picks.iter().map(|p| p.item).collect();
        assert_eq!(items, all);
    }

    #[test]
    fn margin_kcenter_avoids_near_duplicates_that_margin_buys() {
        // Items 0..20: the most uncertain, all near the same embedding (near-duplicates).
        // Items 20..25: a little less uncertain, each somewhere else.
        // Items 25..125: confident.
        let n = 125;
        let mut r = rng(3);
        let mut probs = Vec::new();
        let mut emb = Vec::new();
        for i in 0..n {
            let (p, e): ([f32; 2], [f32; 2]) = if i < 20 {
                let z: f32 = StandardNormal.sample(&mut r);
                ([0.5, 0.5], [0.01 * z, 0.0])
            } else if i < 25 {
                let a = (i - 20) as f32 * 1.2;
                ([0.55, 0.45], [50.0 * a.cos(), 50.0 * a.sin()])
            } else {
                let z: f32 = StandardNormal.sample(&mut r);
                ([0.99, 0.01], [z, 20.0])
            };
            probs.extend(p);
            emb.extend(e);
        }
        let candidates: Vec<usize> = (0..n).collect();
        let v = PoolView {
            classes: 2,
            probs: &probs,
            mc_probs: &[],
            mc_samples: 0,
            embeddings: &emb,
            dim: 2,
            candidates: &candidates,
            labeled: &[],
        };
        let dups = |picks: &[Pick]| picks.iter().filter(|p| p.item < 20).count();
        let margin = select(Strategy::Margin, &v, 5, 5, &mut rng(0)).unwrap();
        assert_eq!(dups(&margin), 5);
        let mk = select(Strategy::MarginKcenter, &v, 5, 5, &mut rng(0)).unwrap();
        assert_eq!(mk.len(), 5);
        assert!(dups(&mk) <= 1, "{mk:?}");
        // The shortlist is the 25 most uncertain: no confident item gets in.
        assert!(mk.iter().all(|p| p.item < 25), "{mk:?}");
        // Scores are the margin uncertainties.
        assert!(mk.iter().all(|p| p.score.unwrap() > 0.85));
    }

    #[test]
    fn kmeans_typical_finds_one_typical_item_per_blob_reproducibly() {
        let centers: Vec<Vec<f32>> = (0..5)
            .map(|b| (0..8).map(|j| if j == b { 40.0 } else { 0.0 }).collect())
            .collect();
        let per = 200;
        let emb = blobs(&centers, per, 1.0, 11);
        let picks = kmeans_typical(&emb, 8, 5, 20, 10, &mut rng(7)).unwrap();
        assert_eq!(picks.len(), 5);
        let mut blob: Vec<usize> = picks.iter().map(|p| p.item / per).collect();
        blob.sort_unstable();
        assert_eq!(blob, [0, 1, 2, 3, 4]);
        // Typical = central: each pick is nearer its blob's mean than the average member is.
        for p in &picks {
            let b = p.item / per;
            let mean: Vec<f32> = (0..8)
                .map(|j| (0..per).map(|i| emb[(b * per + i) * 8 + j]).sum::<f32>() / per as f32)
                .collect();
            let avg = (0..per)
                .map(|i| sq_dist(row(&emb, 8, b * per + i), &mean))
                .sum::<f32>()
                / per as f32;
            assert!(sq_dist(row(&emb, 8, p.item), &mean) < 0.5 * avg, "{p:?}");
            assert!(p.score.unwrap() > 0.0);
        }
        assert_eq!(
            picks,
            kmeans_typical(&emb, 8, 5, 20, 10, &mut rng(7)).unwrap()
        );
    }

    #[test]
    fn kmeans_typical_subsamples_big_clusters_and_fills_empty_ones() {
        // One cluster bigger than the typicality subsample still gives a central pick.
        let emb = blobs(&[vec![0.0, 0.0]], 3000, 1.0, 4);
        let picks = kmeans_typical(&emb, 2, 1, 5, 20, &mut rng(0)).unwrap();
        assert_eq!(picks.len(), 1);
        assert!(sq_dist(row(&emb, 2, picks[0].item), &[0.0, 0.0]) < 0.5);

        // Identical points leave clusters empty: still exactly k distinct items.
        let same = vec![2.0f32; 10 * 4];
        let picks = kmeans_typical(&same, 4, 3, 10, 5, &mut rng(0)).unwrap();
        let mut items: Vec<usize> = picks.iter().map(|p| p.item).collect();
        items.sort_unstable();
        items.dedup();
        assert_eq!(items.len(), 3);
        assert!(picks.iter().all(|p| p.score.unwrap().is_finite()));

        assert!(kmeans_typical(&same, 4, 11, 10, 5, &mut rng(0)).is_err());
        assert!(kmeans_typical(&same[..5], 4, 1, 10, 5, &mut rng(0)).is_err());
    }

    /// Timings at pool scale: `cargo test --release strategies -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn timing_at_60k() {
        use std::time::Instant;
        let n = 60_000;
        let mut r = rng(0);
        let e64: Vec<f32> = (0..n * 64).map(|_| StandardNormal.sample(&mut r)).collect();
        let t = Instant::now();
        let picks = kmeans_typical(&e64, 64, 200, 20, 20, &mut rng(1)).unwrap();
        println!(
            "kmeans_typical n=60000 dim=64 k=200 iters=20: {:.2?} ({} threads)",
            t.elapsed(),
            rayon::current_num_threads()
        );
        assert_eq!(picks.len(), 200);

        let e256: Vec<f32> = (0..n * 256)
            .map(|_| StandardNormal.sample(&mut r))
            .collect();
        let all: Vec<usize> = (0..n).collect();
        let t = Instant::now();
        let picks = kcenter_greedy(&e256, 256, &all, &[], 200);
        println!("kcenter_greedy n=60000 dim=256 k=200: {:.2?}", t.elapsed());
        assert_eq!(picks.len(), 200);

        let labeled: Vec<usize> = (0..1000).collect();
        let candidates: Vec<usize> = (1000..n).collect();
        let t = Instant::now();
        kcenter_greedy(&e256, 256, &candidates, &labeled, 200);
        println!(
            "kcenter_greedy n=59000 dim=256 k=200 labeled=1000: {:.2?}",
            t.elapsed()
        );

        let probs = random_probs(n, 10, &mut r);
        let mc = random_probs(n * 20, 10, &mut r);
        let v = PoolView {
            classes: 10,
            probs: &probs,
            mc_probs: &mc,
            mc_samples: 20,
            embeddings: &e256,
            dim: 256,
            candidates: &candidates,
            labeled: &labeled,
        };
        for s in [Strategy::Entropy, Strategy::Bald, Strategy::MarginKcenter] {
            let t = Instant::now();
            select(s, &v, 200, 10, &mut rng(0)).unwrap();
            println!("select {} k=200: {:.2?}", s.name(), t.elapsed());
        }
    }
}
