//! The pool's bookkeeping: which items are bought (as the label database's ledger says), their
//! labels, the rounds, and the validation hold-out. No acquisition logic here (see
//! [`super::strategies`]).

use anyhow::{bail, Result};
use rand::Rng;

use crate::data::batch::{rng_for, stream};
use crate::labels::BoughtLabel;

/// A bought label: `(pool item, class)`.
pub type Labeled = (usize, u8);

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

    /// Splits the bought labels into `(train, validation)` pairs `(item, label)`: a seeded hash of
    /// each item ranks it, the lowest `fraction` go to validation (at least one when there are two
    /// or more labels and `fraction > 0`). Labels only, never the test set, drive model choices.
    pub fn split(&self, fraction: f64, seed: u64) -> (Vec<Labeled>, Vec<Labeled>) {
        let mut ranked: Vec<(u64, usize, u8)> = self
            .bought
            .iter()
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
