//! Joining a finished run (`--join RUN`): a second encoder learns from the labels another run
//! bought, and the final predictions average both runs' final models (an ensemble of two
//! pretrainings that costs no extra label).
//!
//! The joined run's label ledger is copied into this run's database, so every label still reaches
//! the learner through a database that records it, the budget holds, and nothing is bought anew:
//! both members train on the same bought images. The joined run must have finished its
//! semi-supervised stage (its final models are read from its checkpoint) and have bought labels
//! with the same plan (budget, rounds, validation slice, pool).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use burn::module::Module;
use burn::tensor::backend::Backend;
use serde::{Deserialize, Serialize};

use super::config::{FinetuneConfig, SemiMethod};
use super::encoder::{encoder_identity, load_encoder};
use super::semi::SemiProgress;
use crate::checkpoint::{record_from_bytes, Checkpoint};
use crate::data::CLASS_NAMES;
use crate::labels::LabelDb;
use crate::models::Classifier;

/// A finished finetune run that this run joins.
pub struct JoinedRun {
    pub dir: PathBuf,
    pub cfg: FinetuneConfig,
}

/// What a joined run's ensemble reports (`summary.json` `join`): the summary's main figures are
/// the ensemble's; these are each member's alone.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JoinSummary {
    /// The joined run's directory.
    pub run: String,
    /// Models of this run and of the joined run whose class probabilities are averaged (each
    /// model counts once).
    pub models: usize,
    pub joined_models: usize,
    /// This run's final model alone, and the joined run's (test: report only).
    pub test_accuracy_alone: f64,
    pub joined_test_accuracy: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audit_accuracy_alone: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub joined_audit_accuracy: Option<f64>,
}

impl JoinedRun {
    /// Opens `dir` as a run that `cfg` may join: a finished finetune run with the stage, whose
    /// label plan and pool are `cfg`'s.
    pub fn open(dir: &Path, cfg: &FinetuneConfig) -> Result<Self> {
        let config = dir.join("config.toml");
        if !config.exists() {
            bail!(
                "--join {}: not a finetune run (no config.toml there); pass the directory of a \
                 finished `frugal finetune --semi fixmatch` run",
                dir.display()
            );
        }
        let joined = FinetuneConfig::from_file(&config)
            .with_context(|| format!("--join {}: unreadable run config", dir.display()))?;
        if joined.join.is_some() {
            bail!(
                "--join {}: that run joined another run itself; join the first run of the chain",
                dir.display()
            );
        }
        if joined.semi.method != SemiMethod::Fixmatch {
            bail!(
                "--join {}: that run has no semi-supervised stage (its final model is not saved \
                 as a stage's); join a `--semi fixmatch` run",
                dir.display()
            );
        }
        let mut mine = cfg.labels.clone();
        let mut theirs = joined.labels.clone();
        (mine.db, theirs.db) = (None, None);
        // The acquisition strategy is theirs: this run buys nothing.
        (mine.strategy, mine.cold_start) = (theirs.strategy, theirs.cold_start);
        if mine != theirs || cfg.data.limit != joined.data.limit {
            bail!(
                "--join {}: that run bought labels with another plan (budget {}, first batch {}, \
                 {} per round, validation {} of {}; pool {:?}) than this one (budget {}, first \
                 batch {}, {} per round, validation {} of {}; pool {:?}): give the same label \
                 flags",
                dir.display(),
                theirs.budget,
                theirs.initial,
                theirs.per_round,
                theirs.validation.name(),
                theirs.validation_fraction,
                joined.data.limit,
                mine.budget,
                mine.initial,
                mine.per_round,
                mine.validation.name(),
                mine.validation_fraction,
                cfg.data.limit
            );
        }
        let run = Self {
            dir: dir.into(),
            cfg: joined,
        };
        run.finished_stage()?;
        Ok(run)
    }

    /// The joined run's label database.
    pub fn label_db(&self) -> PathBuf {
        self.cfg
            .labels
            .db
            .clone()
            .unwrap_or_else(|| self.dir.join("labels.db"))
    }

    /// Copies the joined run's label database (ground truth and ledger) to `to`, a path where
    /// nothing is yet.
    pub fn copy_ledger(&self, to: &Path) -> Result<()> {
        let from = self.label_db();
        let db = LabelDb::open(&from)
            .with_context(|| format!("--join {}: cannot open its labels", self.dir.display()))?;
        db.copy_to(to)?;
        Ok(())
    }

    /// The checkpoint, and the stage's progress in it, of the finished joined run.
    fn finished_stage(&self) -> Result<(Checkpoint, PathBuf, SemiProgress)> {
        let path = self.dir.join("checkpoint.bin");
        if !path.exists() {
            bail!(
                "--join {}: no checkpoint.bin there: that run has not trained yet (run it to its \
                 end first)",
                self.dir.display()
            );
        }
        let ck = Checkpoint::load(&path)
            .with_context(|| format!("--join {}: unreadable checkpoint", self.dir.display()))?;
        // Its weights fit only the encoder they were trained on: refuse one pretrained again since.
        let identity = encoder_identity(&self.cfg.encoder).with_context(|| {
            format!(
                "--join {}: cannot read the encoder it was trained on",
                self.dir.display()
            )
        })?;
        if ck.header.architecture.get("encoder") != Some(&identity) {
            bail!(
                "--join {}: its encoder run {} has changed since that run trained on it (another \
                 architecture or pretraining): its final models cannot be loaded",
                self.dir.display(),
                self.cfg.encoder.display()
            );
        }
        let progress = ck
            .header
            .extra
            .get("semi")
            .cloned()
            .filter(|v| !v.is_null())
            .map(serde_json::from_value::<SemiProgress>)
            .transpose()
            .with_context(|| format!("{}: unreadable stage progress", path.display()))?;
        match progress {
            Some(p) if ck.header.finished && p.finished => Ok((ck, path, p)),
            _ => bail!(
                "--join {}: that run has not finished (resume it to its end first)",
                self.dir.display()
            ),
        }
    }

    /// The joined run's final models (its stage members' kept weights), on its own encoder's
    /// architecture.
    pub fn final_models<B: Backend>(&self, device: &B::Device) -> Result<Vec<Classifier<B>>> {
        let (ck, path, progress) = self.finished_stage()?;
        let pretrained = load_encoder::<B>(&self.cfg.encoder, device).with_context(|| {
            format!(
                "--join {}: cannot load the encoder it was trained on",
                self.dir.display()
            )
        })?;
        let skeleton = Classifier::new(
            Some(pretrained.encoder),
            pretrained.feature_dim,
            self.cfg.model.hidden,
            CLASS_NAMES.len(),
            device,
        );
        let names = (0..progress.member)
            .map(|m| format!("semi_member_{m}"))
            .chain(std::iter::once("semi_best".to_string()));
        names
            .map(|name| {
                let record = record_from_bytes::<B, _>(ck.blob(&path, &name)?, device)?;
                Ok(skeleton.clone().load_record(record))
            })
            .collect()
    }
}
