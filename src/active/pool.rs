//! The pool's bookkeeping: which items are bought (as the label database's ledger says), their
//! labels, the rounds, and the validation hold-out. No acquisition logic here (see
//! [`super::strategies`]).

use anyhow::{bail, Result};
use rand::Rng;

use crate::data::batch::{rng_for, stream};
use crate::labels::BoughtLabel;

/// A bought label: `(pool item, class)`.
pub type Labeled = (usize, u8);

/// The ledger's strategy name of the labels bought for a random validation slice
/// ([`ValidationSlice::Random`]).
pub const VALIDATION_STRATEGY: &str = "validation";

/// The ledger's strategy name of the labels bought for an audit slice ([`ValidationSlice::Audit`]).
pub const AUDIT_STRATEGY: &str = "audit";

/// Which bought labels validate (early stopping, the choice of the kept weights).
#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    serde::Serialize,
    serde::Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "kebab-case")]
pub enum ValidationSlice {
    /// A seeded hash picks a share of the labels bought by the run's own strategy: no label is
    /// spent on validation alone, but the slice is as hard as what the strategy buys, so its
    /// accuracy cannot be compared across strategies.
    #[default]
    Split,
    /// A seeded random sample of the pool, bought with the first batch and recorded in the
    /// ledger as `validation`: the same images for every strategy with the same seed, so
    /// validation accuracies compare across strategies.
    Random,
    /// A random slice bought as for `Random` (ledger: `audit`) that nothing trains or validates
    /// on: validation is the `Split` of the other labels, and the slice's accuracy is reported
    /// only. It judges, on bought labels, settings that use up the validation labels themselves
    /// (a refit of the stage), and no early stopping has seen it.
    Audit,
}

impl ValidationSlice {
    /// The name of `--validation` and of the config's `labels.validation`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Split => "split",
            Self::Random => "random",
            Self::Audit => "audit",
        }
    }

    /// The ledger's strategy name of the random slice bought in round 0.
    pub fn slice_strategy(self) -> &'static str {
        match self {
            Self::Audit => AUDIT_STRATEGY,
            Self::Split | Self::Random => VALIDATION_STRATEGY,
        }
    }
}

/// The pool of `size` training images and the labels bought so far.
#[derive(Debug, Clone)]
pub struct Pool {
    size: usize,
    bought: Vec<BoughtLabel>,
    is_bought: Vec<bool>,
}

impl Pool {
    /// The pool as the ledger tells it. Refuses ledger entries outside the pool and rounds that
    /// are not numbered 0, 1, 2, ... in purchase order.
    pub fn from_ledger(size: usize, bought: Vec<BoughtLabel>) -> Result<Self> {
        let mut is_bought = vec![false; size];
        let mut round = 0;
        for b in &bought {
            let item = b.item as usize;
            if item >= size {
                bail!("the label database holds item {item}, outside the pool of {size} images");
            }
            if b.round < round || b.round > round + 1 {
                bail!(
                    "the label database's ledger has round {} after round {round}: it was written \
                     by another plan",
                    b.round
                );
            }
            round = b.round;
            is_bought[item] = true;
        }
        if bought.first().is_some_and(|b| b.round != 0) {
            bail!("the label database's ledger does not start with round 0");
        }
        Ok(Self {
            size,
            bought,
            is_bought,
        })
    }

    /// Items in the pool.
    pub fn size(&self) -> usize {
        self.size
    }

    /// Labels bought.
    pub fn spent(&self) -> u64 {
        self.bought.len() as u64
    }

    /// Rounds with purchases (round numbers are `0..rounds()`).
    pub fn rounds(&self) -> u32 {
        self.bought.last().map_or(0, |b| b.round + 1)
    }

    /// Labels bought in round `round`.
    pub fn bought_in(&self, round: u32) -> Vec<&BoughtLabel> {
        self.bought.iter().filter(|b| b.round == round).collect()
    }

    /// Items not bought yet, ascending.
    pub fn candidates(&self) -> Vec<usize> {
        (0..self.size).filter(|&i| !self.is_bought[i]).collect()
    }

    /// Items bought, ascending.
    pub fn labeled(&self) -> Vec<usize> {
        (0..self.size).filter(|&i| self.is_bought[i]).collect()
    }

    /// Bought labels per class.
    pub fn class_counts(&self, classes: usize) -> Vec<u64> {
        let mut counts = vec![0; classes];
        for b in &self.bought {
            counts[b.label as usize] += 1;
        }
        counts
    }

    /// Class of every bought label, in purchase order.
    pub fn labeled_classes(&self) -> Vec<u8> {
        self.bought.iter().map(|b| b.label).collect()
    }

    /// Splits the bought labels into `(train, validation)` pairs `(item, label)`, both ascending.
    /// [`ValidationSlice::Split`]: see [`Pool::hash_split`]. [`ValidationSlice::Random`]: the
    /// labels the ledger records as bought for validation ([`VALIDATION_STRATEGY`]) validate, all
    /// others train. [`ValidationSlice::Audit`]: the hash split of the labels not bought for the
    /// audit ([`Pool::audit`]). Labels only, never the test set, drive model choices.
    pub fn split(
        &self,
        slice: ValidationSlice,
        fraction: f64,
        seed: u64,
    ) -> (Vec<Labeled>, Vec<Labeled>) {
        match slice {
            ValidationSlice::Split => self.hash_split(self.bought.iter(), fraction, seed),
            ValidationSlice::Audit => self.hash_split(
                self.bought.iter().filter(|b| b.strategy != AUDIT_STRATEGY),
                fraction,
                seed,
            ),
            ValidationSlice::Random => {
                let (mut val, mut train): (Vec<Labeled>, Vec<Labeled>) = (Vec::new(), Vec::new());
                for b in &self.bought {
                    let to = if b.strategy == VALIDATION_STRATEGY {
                        &mut val
                    } else {
                        &mut train
                    };
                    to.push((b.item as usize, b.label));
                }
                val.sort_unstable();
                train.sort_unstable();
                (train, val)
            }
        }
    }

    /// The labels bought for the audit ([`ValidationSlice::Audit`]) as pairs `(item, label)`,
    /// ascending; empty for the other slices. Reported on, never trained or validated on.
    pub fn audit(&self) -> Vec<Labeled> {
        let mut audit: Vec<Labeled> = self
            .bought
            .iter()
            .filter(|b| b.strategy == AUDIT_STRATEGY)
            .map(|b| (b.item as usize, b.label))
            .collect();
        audit.sort_unstable();
        audit
    }

    /// A seeded hash of each of `labels` ranks it, the lowest `fraction` go to validation (at
    /// least one when there are two or more labels and `fraction > 0`).
    fn hash_split<'a>(
        &self,
        labels: impl Iterator<Item = &'a BoughtLabel>,
        fraction: f64,
        seed: u64,
    ) -> (Vec<Labeled>, Vec<Labeled>) {
        let mut ranked: Vec<(u64, usize, u8)> = labels
            .map(|b| {
                let key = rng_for(seed, stream::VALIDATION, b.item).random::<u64>();
                (key, b.item as usize, b.label)
            })
            .collect();
        ranked.sort_unstable();
        let n = ranked.len();
        let mut n_val = (fraction * n as f64).round() as usize;
        if fraction > 0.0 && n >= 2 {
            n_val = n_val.clamp(1, n - 1);
        }
        let mut val: Vec<Labeled> = ranked[..n_val].iter().map(|&(_, i, l)| (i, l)).collect();
        let mut train: Vec<Labeled> = ranked[n_val..].iter().map(|&(_, i, l)| (i, l)).collect();
        val.sort_unstable();
        train.sort_unstable();
        (train, val)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slice_names_are_the_config_names() {
        for v in [
            ValidationSlice::Split,
            ValidationSlice::Random,
            ValidationSlice::Audit,
        ] {
            assert_eq!(serde_json::to_value(v).unwrap(), v.name());
        }
    }

    fn bought(items: &[(u64, u32)]) -> Vec<BoughtLabel> {
        items
            .iter()
            .enumerate()
            .map(|(k, &(item, round))| BoughtLabel {
                seq: k as u64 + 1,
                item,
                label: (item % 10) as u8,
                round,
                strategy: "test".into(),
                score: None,
                bought_at: String::new(),
            })
            .collect()
    }

    #[test]
    fn ledger_gives_rounds_candidates_and_counts() {
        let pool = Pool::from_ledger(10, bought(&[(3, 0), (5, 0), (7, 1)])).unwrap();
        assert_eq!(pool.spent(), 3);
        assert_eq!(pool.rounds(), 2);
        assert_eq!(pool.labeled(), vec![3, 5, 7]);
        assert_eq!(pool.candidates(), vec![0, 1, 2, 4, 6, 8, 9]);
        assert_eq!(pool.bought_in(1).len(), 1);
        assert_eq!(pool.class_counts(10)[5], 1);
    }

    #[test]
    fn foreign_ledgers_are_refused() {
        assert!(
            Pool::from_ledger(4, bought(&[(9, 0)])).is_err(),
            "item outside the pool"
        );
        assert!(
            Pool::from_ledger(10, bought(&[(1, 1)])).is_err(),
            "no round 0"
        );
        assert!(
            Pool::from_ledger(10, bought(&[(1, 0), (2, 2)])).is_err(),
            "a round skipped"
        );
        assert!(Pool::from_ledger(10, bought(&[(1, 0), (2, 1), (3, 0)])).is_err());
    }

    #[test]
    fn validation_split_is_seeded_disjoint_and_mostly_stable() {
        let items: Vec<(u64, u32)> = (0..200).map(|i| (i * 3, (i / 50) as u32)).collect();
        let pool = Pool::from_ledger(600, bought(&items)).unwrap();
        let (train, val) = pool.split(ValidationSlice::Split, 0.2, 1);
        assert_eq!((train.len(), val.len()), (160, 40));
        assert!(val.iter().all(|v| !train.contains(v)));
        assert_eq!(
            pool.split(ValidationSlice::Split, 0.2, 1),
            (train.clone(), val.clone())
        );
        assert_ne!(
            pool.split(ValidationSlice::Split, 0.2, 2).1,
            val,
            "another seed, another hold-out"
        );
        // Growing the ledger keeps most of the old validation items in validation.
        let more: Vec<(u64, u32)> = (0..250).map(|i| (i * 2, (i / 50) as u32)).collect();
        let bigger = Pool::from_ledger(600, bought(&more)).unwrap();
        let (_, val2) = bigger.split(ValidationSlice::Split, 0.2, 1);
        let common = val.iter().filter(|v| val2.contains(v)).count();
        let shared = val.iter().filter(|(i, _)| i % 2 == 0).count();
        assert!(common * 2 >= shared, "{common} of {shared}");
        // Tiny sets still get one validation label, never all of them.
        let tiny = Pool::from_ledger(10, bought(&[(1, 0), (2, 0)])).unwrap();
        let (t, v) = tiny.split(ValidationSlice::Split, 0.2, 1);
        assert_eq!((t.len(), v.len()), (1, 1));
    }

    #[test]
    fn random_slice_is_what_the_ledger_bought_for_validation() {
        let mut ledger = bought(&[(4, 0), (8, 0), (2, 0), (6, 1)]);
        ledger[0].strategy = VALIDATION_STRATEGY.into();
        ledger[2].strategy = VALIDATION_STRATEGY.into();
        let pool = Pool::from_ledger(10, ledger).unwrap();
        let (train, val) = pool.split(ValidationSlice::Random, 0.2, 1);
        assert_eq!(val, vec![(2, 2), (4, 4)]);
        assert_eq!(train, vec![(6, 6), (8, 8)]);
        // Neither the seed nor the fraction moves it.
        assert_eq!(pool.split(ValidationSlice::Random, 0.5, 9), (train, val));
        assert!(pool.audit().is_empty());
    }

    #[test]
    fn audit_slice_is_held_out_of_both_train_and_validation() {
        let items: Vec<(u64, u32)> = (0..100).map(|i| (i * 2, (i / 50) as u32)).collect();
        let mut ledger = bought(&items);
        for b in ledger.iter_mut().take(20) {
            b.strategy = AUDIT_STRATEGY.into();
        }
        let pool = Pool::from_ledger(200, ledger.clone()).unwrap();
        let audit = pool.audit();
        assert_eq!(audit.len(), 20);
        assert_eq!(audit[0], (0, 0));
        let (train, val) = pool.split(ValidationSlice::Audit, 0.25, 1);
        assert_eq!((train.len(), val.len()), (60, 20));
        assert!(train.iter().chain(&val).all(|x| !audit.contains(x)));
        // The hold-out of the other labels is the split they would get without the audit.
        let others = Pool::from_ledger(200, ledger[20..].to_vec());
        let others = others.expect("the ledger without round 0's audit still starts at round 0");
        assert_eq!(others.split(ValidationSlice::Split, 0.25, 1), (train, val));
    }
}
