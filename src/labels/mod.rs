//! The label database: the simulated oracle and the ledger of bought labels, in one SQLite file.
//!
//! The rule of the project: a training-set label reaches the learner only through
//! [`LabelDb::query`], which records each item in the ledger and charges for it once. The budget
//! is enforced by the database itself, inside the purchase transaction (a trigger refuses any
//! ledger row past the budget), so no crash, bug or hand-written SQL can overspend.
//!
//! [`import`] is the only code that reads the training label file: it copies the labels into the
//! hidden `ground_truth` table of a new database, and from then on the file is not needed.
//!
//! The file can be inspected with the `sqlite3` shell (`sqlite3 labels.db 'SELECT * FROM ledger'`).
//! Its schema (version 1, `PRAGMA user_version = 1`,
//! `PRAGMA application_id = 0x46525547` "FRUG"):
//!
#![doc = concat!("```sql\n", include_str!("schema.sql"), "```")]

mod db;

use std::fmt;
use std::path::{Path, PathBuf};

use anyhow::Context;

use crate::data::{FashionMnist, Split, CLASS_NAMES, IMAGE_SIDE};
use crate::tensorboard::record::crc32c;

pub use db::LabelDb;

/// `PRAGMA application_id` of a frugal label database: "FRUG" in ASCII.
pub const APPLICATION_ID: i32 = 0x4652_5547;
/// `PRAGMA user_version` of the schema this frugal writes and reads.
pub const SCHEMA_VERSION: i32 = 1;
/// Name of the training split of Fashion-MNIST in the `dataset` meta entry.
pub const FASHION_TRAIN: &str = "fashion-mnist/train";

/// Which items a database holds labels for: a name, a count and a fingerprint of their pixels,
/// so that a ledger is never used with images its item numbers do not refer to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatasetId {
    /// E.g. `"fashion-mnist/train"`.
    pub name: String,
    /// Number of items (after any `--limit`).
    pub items: u64,
    /// CRC-32C of the items' pixel bytes, in item order, as 8 lowercase hex digits.
    pub fingerprint: String,
}

impl DatasetId {
    /// The identity of the training images `images` (all of them, in order).
    pub fn of_train_images(images: &FashionMnist) -> Self {
        // One CRC over the concatenated pixels (47 MB for the full split): the CRC at hand has no
        // streaming form, and a transient copy costs far less than the CRC itself.
        let mut pixels = Vec::with_capacity(images.len() * IMAGE_SIDE * IMAGE_SIDE);
        for i in 0..images.len() {
            pixels.extend_from_slice(images.image(i));
        }
        Self {
            name: FASHION_TRAIN.to_string(),
            items: images.len() as u64,
            fingerprint: format!("{:08x}", crc32c(&pixels)),
        }
    }
}

impl fmt::Display for DatasetId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} ({} items, fingerprint {})",
            self.name, self.items, self.fingerprint
        )
    }
}

/// One item to buy the label of, and why it was chosen (recorded in the ledger).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Purchase<'a> {
    /// Index of the item in the dataset.
    pub item: u64,
    /// Active-learning round that asked for it.
    pub round: u32,
    /// Acquisition strategy that chose it, e.g. `"entropy"`.
    pub strategy: &'a str,
    /// The strategy's score of the item, if it has one. (NaN is stored as NULL by SQLite.)
    pub score: Option<f64>,
}

/// One row of the ledger.
#[derive(Debug, Clone, PartialEq)]
pub struct BoughtLabel {
    /// Position in purchase order (1-based, increasing, never reused).
    pub seq: u64,
    pub item: u64,
    pub label: u8,
    pub round: u32,
    pub strategy: String,
    pub score: Option<f64>,
    /// UTC time of the purchase, ISO 8601 with milliseconds.
    pub bought_at: String,
}

/// Labels bought in one round by one strategy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoundStatus {
    pub round: u32,
    pub strategy: String,
    pub bought: u64,
}

/// What `frugal labels status` shows: the budget, what was spent, and on what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabelStatus {
    pub dataset: DatasetId,
    /// `None`: no budget (every label may be bought).
    pub budget: Option<u64>,
    /// Labels bought so far.
    pub spent: u64,
    /// Labels bought per class, indexed by label (`CLASS_NAMES.len()` entries).
    pub per_class: Vec<u64>,
    /// Labels bought per round and strategy, by round.
    pub per_round: Vec<RoundStatus>,
}

impl LabelStatus {
    /// Labels that may still be bought, `None` without a budget.
    pub fn remaining(&self) -> Option<u64> {
        self.budget.map(|b| b.saturating_sub(self.spent))
    }
}

/// `part` as a percentage of `whole`, for the report (blank when `whole` is 0).
fn percent(part: u64, whole: u64) -> String {
    if whole == 0 {
        String::new()
    } else {
        format!("{:5.1}%", 100.0 * part as f64 / whole as f64)
    }
}

impl fmt::Display for LabelStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "dataset    {}", self.dataset)?;
        match self.budget {
            Some(budget) => {
                writeln!(f, "budget     {budget}")?;
                writeln!(
                    f,
                    "spent      {} ({} of the budget)",
                    self.spent,
                    percent(self.spent, budget).trim_start()
                )?;
                writeln!(f, "remaining  {}", budget.saturating_sub(self.spent))?;
            }
            None => {
                writeln!(f, "budget     none (every label may be bought)")?;
                writeln!(f, "spent      {}", self.spent)?;
            }
        }

        let name_width = CLASS_NAMES.iter().map(|n| n.len()).max().unwrap_or(0);
        writeln!(f)?;
        writeln!(
            f,
            "{:>5}  {:<name_width$}  {:>8}",
            "label", "class", "bought"
        )?;
        for (label, &bought) in self.per_class.iter().enumerate() {
            let name = CLASS_NAMES.get(label).copied().unwrap_or("?");
            writeln!(
                f,
                "{label:>5}  {name:<name_width$}  {bought:>8}  {}",
                percent(bought, self.spent)
            )?;
        }

        writeln!(f)?;
        if self.per_round.is_empty() {
            write!(f, "no labels bought yet")?;
        } else {
            let strategy_width = self
                .per_round
                .iter()
                .map(|r| r.strategy.len())
                .chain(["strategy".len()])
                .max()
                .unwrap_or(0);
            write!(
                f,
                "{:>5}  {:<strategy_width$}  {:>8}",
                "round", "strategy", "bought"
            )?;
            for r in &self.per_round {
                write!(
                    f,
                    "\n{:>5}  {:<strategy_width$}  {:>8}",
                    r.round, r.strategy, r.bought
                )?;
            }
        }
        Ok(())
    }
}

/// Why a label database cannot be opened, created or used. None of these leaves a purchase
/// half-recorded: every change is one transaction.
#[derive(Debug, thiserror::Error)]
pub enum LabelDbError {
    #[error(
        "no label database at {0} (create one with `frugal labels import`, or check the path)"
    )]
    NotFound(PathBuf),
    #[error("{0} is not a label database: file is not a database (not an SQLite file at all)")]
    NotSqlite(PathBuf),
    #[error(
        "{0} is not a frugal label database (an SQLite file of another application); \
         pass the file `frugal labels import` created"
    )]
    NotLabelDb(PathBuf),
    #[error(
        "label database {path} has schema version {found}; this frugal reads version \
         {SCHEMA_VERSION} (use the frugal that created it)"
    )]
    Version { path: PathBuf, found: i32 },
    #[error(
        "label database {path} holds labels of {found}, but the images are {expected}; \
         use the database imported from these images (or import a new one)"
    )]
    OtherDataset {
        path: PathBuf,
        // Boxed to keep every `Result<_, LabelDbError>` small.
        found: Box<DatasetId>,
        expected: Box<DatasetId>,
    },
    #[error(
        "label budget of {path} exceeded: {spent} of {budget} labels spent, {asked} more asked \
         for; nothing was bought (raise the budget, or ask for fewer)"
    )]
    BudgetExceeded {
        path: PathBuf,
        budget: u64,
        spent: u64,
        asked: u64,
    },
    #[error(
        "label database {path} has no item {item} (it holds items 0..{items}); nothing was bought"
    )]
    UnknownItem {
        path: PathBuf,
        item: u64,
        items: u64,
    },
    #[error(
        "cannot set the label budget of {path} to {budget}: {spent} labels are already bought \
         (a budget cannot be lower than what was spent)"
    )]
    BudgetBelowSpent {
        path: PathBuf,
        budget: u64,
        spent: u64,
    },
    #[error("{0} already exists; a label database is never overwritten (move it away or pick another path)")]
    AlreadyExists(PathBuf),
    #[error("cannot create label database {path}: {what}")]
    BadInput { path: PathBuf, what: String },
    #[error("label database {path} is damaged ({what}); it was left as is")]
    Corrupt { path: PathBuf, what: String },
    // The cause is in the message and deliberately not a `source()`: `main` prints the chain
    // (`{:#}`), which would show it twice.
    #[error("label database {0}: {1}")]
    Sqlite(PathBuf, rusqlite::Error),
    #[error("label database {path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
}

/// Creates the label database `path` for the training split in `data_dir` (its first `limit`
/// items if given), with `budget` if given.
///
/// This is the only code that reads the training label file. It loads the images too: to check
/// that there is one label per image and to fingerprint the items the labels belong to.
pub fn import(
    path: &Path,
    data_dir: &Path,
    limit: Option<usize>,
    budget: Option<u64>,
) -> anyhow::Result<LabelDb> {
    // Refuse before the (slow) loading, not only at the end.
    if path.symlink_metadata().is_ok() {
        return Err(LabelDbError::AlreadyExists(path.into()).into());
    }
    let images = FashionMnist::load_images(data_dir, Split::Train, limit)
        .context("cannot import training labels")?;
    let labels = FashionMnist::load_labels(data_dir, Split::Train, &images)
        .context("cannot import training labels")?;
    let dataset = DatasetId::of_train_images(&images);
    Ok(LabelDb::create(path, &dataset, &labels, budget)?)
}
