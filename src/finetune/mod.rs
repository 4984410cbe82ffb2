//! `frugal finetune`: active learning on a pretrained encoder.
//!
//! Rounds: buy a first batch (label-free cold start), then repeatedly train the classifier on the
//! bought labels (early stopping on a validation slice of them), score the unlabeled pool, buy the
//! next batch, until the budget is spent. The label database's ledger is the run's state: a
//! resumed run reads which labels it owns from it, and every step after a purchase is
//! deterministic, so a kill at any moment loses at most the work since the last purchase or
//! checkpoint, and no label is bought twice. The test set is scored after each round for the
//! report only; no decision reads it.

pub mod config;
pub mod encoder;
pub mod join;
pub mod report;
pub mod semi;
pub mod train;

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use burn::module::{AutodiffModule, Module};
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use rand::seq::SliceRandom;
use rand_distr::{Distribution, StandardNormal};
use serde::{Deserialize, Serialize};

use crate::active::pool::Labeled;
use crate::active::strategies::{self, Pick, PoolView};
use crate::active::{Pool, ValidationSlice};
use crate::checkpoint::{module_to_bytes, record_from_bytes, Checkpoint, CheckpointHeader};
use crate::data::batch::{fixed_subsample, rng_for, stream};
use crate::data::{FashionMnist, Split, CLASS_NAMES, IMAGE_SIDE};
use crate::device::BackendJob;
use crate::labels::{self, DatasetId, LabelDb, Purchase};
use crate::models::{host_values, Classifier, Encoder};
use crate::pretrain::ProjectorSample;
use crate::progress::log;
use crate::run::{MetricsCsv, RunDir};
use crate::tensorboard::{image_grid, EventWriter};
use config::{ColdStart, FinetuneConfig, Freeze, SemiKeep, SemiMethod};
use encoder::{encode_all, load_encoder};
use join::{JoinSummary, JoinedRun};
use report::{per_class_map, ConfusionMatrix, FinetuneSummary, FlipSummary, SemiSummary};
use semi::{SemiBlobs, SemiProgress, SemiState};
use train::{score, train_round, Inputs, RoundTraining, Set};

/// The stage name recorded in checkpoints.
pub const STAGE: &str = "finetune";

/// Dimension of the random projection the k-means cold start clusters in.
const COLD_START_DIM: usize = 64;

/// A finetune run, ready to start or to resume.
pub struct FinetuneRun {
    pub cfg: FinetuneConfig,
    pub run: RunDir,
    pub resume: bool,
}

impl FinetuneRun {
    /// The label database: `labels.db` in the run directory unless the config names one.
    pub fn label_db_path(&self) -> PathBuf {
        self.cfg
            .labels
            .db
            .clone()
            .unwrap_or_else(|| self.run.root.join("labels.db"))
    }
}

/// Runs (or resumes) a finetune run on the configured device.
pub fn finetune(run: FinetuneRun) -> Result<FinetuneSummary> {
    if run.resume {
        if let Some(summary) = finished(&run.run, &run.cfg)? {
            log(
                None,
                &format!(
                    "{} has finished already: nothing to do",
                    run.run.root.display()
                ),
            );
            return Ok(summary);
        }
    }
    let (kind, threads) = (run.cfg.device, run.cfg.train.threads);
    crate::device::run_on(kind, threads, FinetuneJob(run))
}

/// The summary of a run whose last checkpoint says it finished, if it did. Refuses, as a resume
/// would, an encoder run that changed since.
fn finished(run: &RunDir, cfg: &FinetuneConfig) -> Result<Option<FinetuneSummary>> {
    let path = run.checkpoint();
    if !path.exists() {
        return Ok(None);
    }
    let ck = Checkpoint::load(&path)?;
    if !ck.header.finished {
        return Ok(None);
    }
    let mut expected = ck.header.architecture.clone();
    expected["encoder"] = encoder::encoder_identity(&cfg.encoder)?;
    ck.expect(&path, STAGE, cfg.labels.strategy.name(), &expected)?;
    let Ok(text) = std::fs::read_to_string(run.summary()) else {
        return Ok(None);
    };
    Ok(serde_json::from_str(&text).ok())
}

struct FinetuneJob(FinetuneRun);

/// What the checkpoint's `extra` holds besides the header counters.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Saved {
    /// The config's plan ([`FinetuneConfig::plan`]) the run was started with.
    plan: serde_json::Value,
    /// The model was trained on the labels of rounds `0..rounds_trained`.
    rounds_trained: u32,
    training: RoundTraining,
    /// Wall-clock seconds of earlier sessions.
    seconds: f64,
    /// The semi-supervised stage, once it has started (its weights are blobs `semi_*`).
    #[serde(default)]
    semi: Option<SemiProgress>,
}

impl BackendJob for FinetuneJob {
    type Output = FinetuneSummary;

    fn run<B: AutodiffBackend>(self, device: B::Device) -> Result<FinetuneSummary> {
        let started = Instant::now();
        let db_path = self.0.label_db_path();
        let FinetuneRun { cfg, run, resume } = self.0;
        let seed = cfg.train.seed;
        let classes = CLASS_NAMES.len();

        let pool_images = FashionMnist::load_images(&cfg.data.dir, Split::Train, cfg.data.limit)?;
        cfg.validate(Some(pool_images.len() as u64))?;
        let test_images =
            FashionMnist::load_images(&cfg.data.dir, Split::Test, cfg.data.test_limit)?;
        // Test labels are for the report only: no decision below reads them.
        let test_labels = FashionMnist::load_labels(&cfg.data.dir, Split::Test, &test_images)?;
        let pretrained = load_encoder::<B>(&cfg.encoder, &device)?;
        if !pretrained.finished {
            log(
                None,
                &format!(
                    "note: the encoder run {} has not finished pretraining (epoch {})",
                    cfg.encoder.display(),
                    pretrained.epochs
                ),
            );
        }
        let architecture = serde_json::json!({
            "encoder": pretrained.identity,
            "model": cfg.model,
            "classes": classes,
        });
        let method = cfg.labels.strategy.name();

        // A joined run lends its bought labels: its ledger, copied before anything else, is this
        // run's whole purchase.
        let joined = match &cfg.join {
            Some(dir) => Some(JoinedRun::open(dir, &cfg)?),
            None => None,
        };
        let mut ledger_copied = false;
        if let Some(j) = &joined {
            if !db_path.exists() {
                j.copy_ledger(&db_path)?;
                ledger_copied = true;
                log(
                    None,
                    &format!(
                        "joining {}: its bought labels copied to {}",
                        j.dir.display(),
                        db_path.display()
                    ),
                );
            }
        }
        // The label database: the run's ledger and the only source of training labels.
        let mut db = open_label_db(
            &db_path,
            &cfg,
            &pool_images,
            resume || ledger_copied,
            run.checkpoint().exists(),
        )?;
        let mut pool = Pool::from_ledger(pool_images.len(), db.bought()?)?;
        let sizes = cfg.labels.round_sizes();
        check_ledger(&pool, &sizes)?;
        if joined.is_some() && (pool.rounds() as usize) < sizes.len() {
            bail!(
                "{}: the joined run's ledger holds {} of {} rounds: a joined run buys nothing \
                 itself (join a finished run, with the same label flags)",
                db_path.display(),
                pool.rounds(),
                sizes.len()
            );
        }

        // The model of the last checkpoint, if it was trained on exactly the labels bought.
        let ckpt_path = run.checkpoint();
        let mut seconds_before = 0.0;
        let mut trained: Option<(Classifier<B>, RoundTraining)> = None;
        let mut semi_saved: Option<(SemiProgress, SemiBlobs)> = None;
        if resume && ckpt_path.exists() {
            let ck = Checkpoint::load(&ckpt_path)?;
            ck.expect(&ckpt_path, STAGE, method, &architecture)?;
            let saved: Saved = serde_json::from_value(ck.header.extra.clone()).map_err(|e| {
                anyhow::anyhow!("{}: unreadable progress: {e}", ckpt_path.display())
            })?;
            if saved.plan != cfg.plan() {
                bail!(
                    "cannot resume {} with another label plan, model or seed (saved: {})",
                    run.root.display(),
                    saved.plan
                );
            }
            seconds_before = saved.seconds;
            if let (Some(progress), true) = (saved.semi, saved.rounds_trained == pool.rounds()) {
                let blob =
                    |name: &str| -> Result<Vec<u8>> { Ok(ck.blob(&ckpt_path, name)?.to_vec()) };
                // Absent from checkpoints written before selection by loss existed.
                let optional = |name: &str| blob(name).unwrap_or_default();
                let blobs = SemiBlobs {
                    learned: blob("semi_learned")?,
                    model: blob("semi_model")?,
                    ema: blob("semi_ema")?,
                    best: blob("semi_best")?,
                    optimizer: blob("semi_optimizer")?,
                    losses: optional("semi_losses"),
                    pass: optional("semi_pass"),
                    members: (0..progress.member)
                        .map(|m| blob(&format!("semi_member_{m}")))
                        .collect::<Result<_>>()?,
                };
                semi_saved = Some((progress, blobs));
            }
            if saved.rounds_trained == pool.rounds() {
                let record = record_from_bytes::<B, _>(ck.blob(&ckpt_path, "model")?, &device)?;
                let model =
                    new_classifier(&cfg, &pretrained.encoder, pretrained.feature_dim, &device)
                        .load_record(record);
                trained = Some((model, saved.training));
            }
        }
        if resume {
            log(
                None,
                &format!(
                    "resuming {}: {} labels bought in {} rounds (from {})",
                    run.root.display(),
                    pool.spent(),
                    pool.rounds(),
                    db_path.display()
                ),
            );
        }

        // With a frozen encoder its features are computed once; the head trains on them.
        let encoder_inner = pretrained.encoder.clone().valid();
        let features = if cfg.model.freeze == Freeze::Encoder {
            let f_pool = encode_all(
                &encoder_inner,
                &pool_images,
                cfg.train.eval_batch_size,
                "features (pool)",
                &device,
            )?;
            let f_test = encode_all(
                &encoder_inner,
                &test_images,
                cfg.train.eval_batch_size,
                "features (test)",
                &device,
            )?;
            Some((f_pool, f_test, pretrained.feature_dim))
        } else {
            None
        };
        let mut inputs = Inputs::new(&pool_images, &test_images, features, &cfg);

        let mut tb = EventWriter::create(&run.root)?;
        // TensorBoard drops what an interrupted process logged at steps >= this one.
        tb.add_session_start(pool.spent())?;
        let audited = cfg.labels.validation == ValidationSlice::Audit;
        let mut header = vec![
            "labels",
            "round",
            "train_labels",
            "validation_labels",
            "epochs",
            "best_epoch",
            "train_loss",
            "validation_accuracy",
            "validation_loss",
            "test_accuracy",
            "seconds",
        ];
        if audited {
            header.push("audit_accuracy");
        }
        let mut csv = MetricsCsv::open(
            &run.metrics(),
            &header,
            (pool.spent() > 0).then(|| pool.spent() - 1),
        )?;

        let writer = CheckpointWriter {
            path: &ckpt_path,
            cfg: &cfg,
            method,
            architecture: &architecture,
        };
        let (model, training, test_probs, audit_before) = loop {
            let round = pool.rounds();
            if round == 0 {
                // The random validation (or audit) slice is drawn first, from the whole pool, so
                // every strategy and cold start with this seed holds out the same images.
                let slice = random_picks(
                    &pool.candidates(),
                    cfg.labels.validation_slice_size() as usize,
                    seed,
                    stream::VALIDATION_SLICE,
                );
                let in_slice: std::collections::HashSet<usize> =
                    slice.iter().map(|p| p.item).collect();
                let candidates: Vec<usize> = pool
                    .candidates()
                    .into_iter()
                    .filter(|i| !in_slice.contains(i))
                    .collect();
                let k = sizes[0] as usize - slice.len();
                let picks = match cfg.labels.cold_start {
                    ColdStart::Random => random_picks(&candidates, k, seed, stream::ACQUIRE),
                    ColdStart::Kmeans => {
                        let f = match &inputs.features {
                            Some((f, _, _)) => project::<B::InnerBackend>(
                                f,
                                pretrained.feature_dim,
                                seed,
                                &device,
                            )?,
                            None => {
                                let f = encode_all(
                                    &encoder_inner,
                                    &pool_images,
                                    cfg.train.eval_batch_size,
                                    "features (cold start)",
                                    &device,
                                )?;
                                project::<B::InnerBackend>(
                                    &f,
                                    pretrained.feature_dim,
                                    seed,
                                    &device,
                                )?
                            }
                        };
                        let f = gather_rows(&f, COLD_START_DIM, &candidates);
                        let mut rng = rng_for(seed, stream::ACQUIRE, 0);
                        strategies::kmeans_typical(&f, COLD_START_DIM, k, 20, 20, &mut rng)?
                            .into_iter()
                            .map(|p| Pick {
                                item: candidates[p.item],
                                ..p
                            })
                            .collect()
                    }
                };
                buy(
                    &mut db,
                    &mut pool,
                    &[
                        (&slice, cfg.labels.validation.slice_strategy()),
                        (&picks, cfg.labels.cold_start.name()),
                    ],
                    0,
                )?;
                log_purchase(&mut tb, &pool, &pool_images, 0, cfg.report.bought_grid)?;
                continue;
            }

            let t_round = Instant::now();
            let (train_set, val_set) = cfg.labels.split(&pool, seed);
            let (model, training) = match trained.take() {
                Some(m) => m,
                None => {
                    let train_items: Vec<usize> = train_set.iter().map(|&(i, _)| i).collect();
                    inputs.prepare_augmented(Some(&encoder_inner), &train_items, &device)?;
                    B::seed(&device, seed.wrapping_add(round as u64));
                    let init =
                        new_classifier(&cfg, &pretrained.encoder, pretrained.feature_dim, &device);
                    let (model, training) =
                        train_round(init, &train_set, &val_set, &inputs, &cfg, round, &device)?;
                    // Checkpoint before anything is logged for this round.
                    let seconds = seconds_before + started.elapsed().as_secs_f64();
                    writer.save(&model, &training, &pool, seconds, None, false)?;
                    (model, training)
                }
            };

            // The report: the test set is scored here and never feeds a decision.
            let inner = model.valid();
            let test_scores = score_test(&inner, &inputs, &cfg, &device)?;
            let cm = ConfusionMatrix::new(&test_scores.probs, &test_labels);
            let audit = audit_accuracy(
                std::slice::from_ref(&inner),
                &inputs,
                &pool.audit(),
                &cfg,
                false,
                &device,
            )?;
            let step = pool.spent();
            tb.add_scalar("labels/spent", step as f32, step)?;
            tb.add_scalar("labels/train", train_set.len() as f32, step)?;
            tb.add_scalar("labels/validation", val_set.len() as f32, step)?;
            tb.add_scalar(
                "accuracy/validation",
                training.validation_accuracy as f32,
                step,
            )?;
            tb.add_scalar("loss/validation", training.validation_loss as f32, step)?;
            tb.add_scalar("loss/train", training.train_loss as f32, step)?;
            tb.add_scalar("accuracy/test", cm.accuracy() as f32, step)?;
            if let Some(a) = audit {
                tb.add_scalar("accuracy/audit", a as f32, step)?;
            }
            tb.add_scalar("train/epochs", training.epochs as f32, step)?;
            let classes_bought: Vec<f32> =
                pool.labeled_classes().iter().map(|&c| c as f32).collect();
            tb.add_histogram("labels/classes", &classes_bought, classes, step)?;
            for (name, n) in CLASS_NAMES.iter().zip(pool.class_counts(classes)) {
                tb.add_scalar(&format!("labels_per_class/{name}"), n as f32, step)?;
            }
            let secs = t_round.elapsed().as_secs_f64();
            let mut row = vec![
                step.to_string(),
                round.to_string(),
                train_set.len().to_string(),
                val_set.len().to_string(),
                training.epochs.to_string(),
                training.best_epoch.to_string(),
                format!("{:.5}", training.train_loss),
                format!("{:.5}", training.validation_accuracy),
                format!("{:.5}", training.validation_loss),
                format!("{:.5}", cm.accuracy()),
                format!("{secs:.1}"),
            ];
            if audited {
                row.push(format!("{:.5}", audit.unwrap_or(f64::NAN)));
            }
            csv.row(&row)?;
            tb.flush()?;
            csv.flush()?;
            log(
                None,
                &format!(
                    "round {round}: {step} labels ({} train / {} validation): validation accuracy \
                     {:.2}% (epoch {} of {}), {}test accuracy {:.2}% (report only), {secs:.0} s",
                    train_set.len(),
                    val_set.len(),
                    100.0 * training.validation_accuracy,
                    training.best_epoch,
                    training.epochs,
                    audit.map_or(String::new(), |a| format!(
                        "audit accuracy {:.2}%, ",
                        100.0 * a
                    )),
                    100.0 * cm.accuracy()
                ),
            );

            if round as usize >= sizes.len() {
                break (model, training, test_scores.probs, audit);
            }

            // Acquisition: score the pool, pick, buy.
            let k = sizes[round as usize] as usize;
            let strategy = cfg.labels.strategy;
            let all: Vec<usize> = (0..pool.size()).collect();
            let mc = if strategy.needs_mc_samples() {
                cfg.labels.mc_samples
            } else {
                0
            };
            let scores = score(
                &inner,
                &inputs,
                Set::Pool,
                &all,
                &cfg,
                strategy.needs_embeddings(),
                mc,
                &device,
            )?;
            let (candidates, labeled) = (pool.candidates(), pool.labeled());
            let view = PoolView {
                classes,
                probs: &scores.probs,
                mc_probs: &scores.mc_probs,
                mc_samples: mc,
                embeddings: &scores.embeddings,
                dim: inner.embedding_dim(),
                candidates: &candidates,
                labeled: &labeled,
            };
            let mut rng = rng_for(seed, stream::ACQUIRE, round as u64);
            let picks =
                strategies::select(strategy, &view, k, cfg.labels.candidate_factor, &mut rng)?;
            buy(&mut db, &mut pool, &[(&picks, strategy.name())], round)?;
            log_purchase(&mut tb, &pool, &pool_images, round, cfg.report.bought_grid)?;
        };

        // The semi-supervised stage: the final classifier learns from the whole pool too.
        let image_inputs;
        let mut semi_summary = None;
        let mut semi_state: Option<SemiState<B>> = None;
        let (final_models, test_probs, inputs) = if cfg.semi.method == SemiMethod::Fixmatch {
            image_inputs = Inputs::new(&pool_images, &test_images, None, &cfg);
            let init = match &model.encoder {
                Some(_) => model.clone(),
                None => semi::unfreeze(
                    model.clone(),
                    pretrained.encoder.clone(),
                    inputs.scaling(),
                    &device,
                ),
            };
            let stage = Stage {
                cfg: &cfg,
                run: &run,
                pool: &pool,
                inputs: &image_inputs,
                test_labels: &test_labels,
                test_accuracy_before: ConfusionMatrix::new(&test_probs, &test_labels).accuracy(),
                validation_accuracy_before: training.validation_accuracy,
                audit_accuracy_before: audit_before,
                deadline_s: cfg
                    .time_budget_minutes
                    .map(|m| m * 60.0 - seconds_before - started.elapsed().as_secs_f64()),
            };
            let mut save = |st: &SemiState<B>| -> Result<()> {
                let seconds = seconds_before + started.elapsed().as_secs_f64();
                writer.save(&model, &training, &pool, seconds, Some(st), false)
            };
            let (state, probs, summary) =
                stage.train(init, semi_saved.take(), &mut save, &device)?;
            semi_summary = Some(summary);
            let final_models = state.ensemble();
            semi_state = Some(state);
            (final_models, probs, &image_inputs)
        } else {
            (vec![model.valid()], test_probs, &inputs)
        };
        let audit = pool.audit();
        let audit_final = match &semi_summary {
            Some(s) => s.audit_accuracy,
            None => audit_before,
        };
        // Test-time flip: the final predictions average each image and its mirror; the figures
        // without it stay in the summary, so one run judges the flip on its audit slice.
        let (test_probs, audit_final, flip_summary) = if cfg.semi.method == SemiMethod::Fixmatch
            && cfg.semi.test_time_flip
        {
            let items: Vec<usize> = (0..test_images.len()).collect();
            let (flipped, _) = ensemble_probs(
                &final_models,
                inputs,
                Set::Test,
                &items,
                &cfg,
                true,
                &device,
            )?;
            let audit_flipped = audit_accuracy(&final_models, inputs, &audit, &cfg, true, &device)?;
            let without = FlipSummary {
                test_accuracy_without: ConfusionMatrix::new(&test_probs, &test_labels).accuracy(),
                audit_accuracy_without: audit_final,
            };
            let after = ConfusionMatrix::new(&flipped, &test_labels).accuracy();
            let audit_text = against("audit accuracy", audit_flipped, audit_final, "without; ");
            log(
                None,
                &format!(
                    "test-time flip: {audit_text}test accuracy {:.2}% against {:.2}% without \
                     (report only)",
                    100.0 * after,
                    100.0 * without.test_accuracy_without
                ),
            );
            (flipped, audit_flipped, Some(without))
        } else {
            (test_probs, audit_final, None)
        };

        // Joined: the final predictions average this run's models and the joined run's.
        let (test_probs, audit_final, join_summary) = match &joined {
            Some(j) => {
                let (probs, audit, summary) = join_ensemble(
                    j,
                    &final_models,
                    inputs,
                    &cfg,
                    (&test_probs, &test_labels),
                    (&audit, audit_final),
                    &device,
                )?;
                (probs, audit, Some(summary))
            }
            None => (test_probs, audit_final, None),
        };

        // The end: predictions, confusion matrix, projector, summary.
        let seconds = seconds_before + started.elapsed().as_secs_f64();
        writer.save(&model, &training, &pool, seconds, semi_state.as_ref(), true)?;
        let cm = ConfusionMatrix::new(&test_probs, &test_labels);
        report::write_predictions(&run.root.join("predictions.csv"), &test_probs)?;
        let step = pool.spent();
        tb.add_image("test/confusion_matrix", &cm.image(24), step)?;
        // The reported figures (after the stage and the test-time flip, when on), next to the
        // rounds' `accuracy/*`.
        tb.add_scalar("final/test_accuracy", cm.accuracy() as f32, step)?;
        if let Some(a) = audit_final {
            tb.add_scalar("final/audit_accuracy", a as f32, step)?;
        }
        if cfg.report.projector_samples > 0 {
            let indices = fixed_subsample(test_images.len(), cfg.report.projector_samples, 0);
            // The last member's embedding (an ensemble has none of its own).
            let inner = final_models.last().expect("at least one model").clone();
            let linear = cfg.model.hidden == 0;
            let emb = score(
                &inner,
                inputs,
                Set::Test,
                &indices,
                &cfg,
                !linear,
                0,
                &device,
            )?;
            let sample = ProjectorSample {
                labels: indices.iter().map(|&i| test_labels[i]).collect(),
                images: test_images.clone(),
                indices,
            };
            // A linear head has no embedding of its own (its input is the encoder's features,
            // thousands wide): show what it predicts instead.
            let (name, vectors, dim) = if linear {
                ("finetuned_probabilities", &emb.probs, CLASS_NAMES.len())
            } else {
                ("finetuned_embedding", &emb.embeddings, cfg.model.hidden)
            };
            sample.write(&run.projector(), name, vectors, dim)?;
        }
        tb.flush()?;
        log(
            None,
            &format!("test confusion matrix (rows: true class):\n{}", cm.table()),
        );

        let (train_set, val_set) = cfg.labels.split(&pool, seed);
        let summary = FinetuneSummary {
            run_dir: run.root.display().to_string(),
            device: cfg.device.to_string(),
            encoder: pretrained.identity.clone(),
            encoder_run: cfg.encoder.display().to_string(),
            strategy: method.into(),
            cold_start: cfg.labels.cold_start.name().into(),
            freeze: format!("{:?}", cfg.model.freeze).to_lowercase(),
            seed,
            labels_budget: cfg.labels.budget,
            labels_bought: db.spent()?,
            rounds: pool.rounds(),
            train_labels: train_set.len(),
            validation_labels: val_set.len(),
            validation_accuracy: semi_summary
                .as_ref()
                .map_or(training.validation_accuracy, |s| s.validation_accuracy),
            audit_labels: audit.len(),
            audit_accuracy: audit_final,
            test_images: test_images.len(),
            test_accuracy: cm.accuracy(),
            per_class_accuracy: per_class_map(&cm.per_class()),
            bought_per_class: per_class_map(&pool.class_counts(classes)),
            confusion_matrix: cm.matrix.clone(),
            seconds,
            semi: semi_summary,
            test_time_flip: flip_summary,
            join: join_summary,
            config: serde_json::to_value(&cfg)?,
        };
        crate::checkpoint::write_atomic(
            &run.summary(),
            serde_json::to_string_pretty(&summary)?.as_bytes(),
        )?;
        Ok(summary)
    }
}

/// The semi-supervised stage of a run, after its last purchase: what it reads.
struct Stage<'a> {
    cfg: &'a FinetuneConfig,
    run: &'a RunDir,
    pool: &'a Pool,
    /// Images only: the stage trains the encoder.
    inputs: &'a Inputs<'a>,
    /// For the report only.
    test_labels: &'a [u8],
    test_accuracy_before: f64,
    validation_accuracy_before: f64,
    /// The last round's accuracy on the audit slice, when there is one (report only).
    audit_accuracy_before: Option<f64>,
    /// Seconds this session may still spend, if there is a time budget.
    deadline_s: Option<f64>,
}

impl Stage<'_> {
    /// Trains the stage from `init` (the last round's classifier with its encoder), or from a
    /// checkpoint's `saved` state, to its end; `save` writes a checkpoint. Returns the final
    /// state, the kept weights' test probabilities (`[test * classes]`, report only) and the
    /// summary.
    fn train<B: AutodiffBackend>(
        &self,
        init: Classifier<B>,
        saved: Option<(SemiProgress, SemiBlobs)>,
        save: &mut dyn FnMut(&SemiState<B>) -> Result<()>,
        device: &B::Device,
    ) -> Result<(SemiState<B>, Vec<f32>, SemiSummary)> {
        let cfg = self.cfg;
        let (mut train_set, mut val_set) = cfg.labels.split(self.pool, cfg.train.seed);
        let audit_set = self.pool.audit();
        if cfg.semi.train_on_validation {
            // Refit: every bought label trains; nothing is left to validate on.
            train_set.append(&mut val_set);
            train_set.sort_unstable();
        }
        let mut state = match saved {
            Some((progress, blobs)) => SemiState::restore(init.clone(), progress, blobs, device)?,
            None => SemiState::start(init.clone()),
        };
        // The validation and audit slices are no pool images: their labels judge the stage.
        let val_items: std::collections::HashSet<usize> =
            val_set.iter().chain(&audit_set).map(|&(i, _)| i).collect();
        let unlabeled: Vec<usize> = (0..self.pool.size())
            .filter(|i| !val_items.contains(i))
            .collect();
        let members = cfg.semi.members;
        let session = Instant::now();
        loop {
            let m = state.progress.member;
            if !state.progress.finished {
                // The first member logs where the stage always has; the others beside it.
                let dir = match m {
                    0 => self.run.root.join("semi"),
                    _ => self.run.root.join("semi").join(format!("member-{}", m + 1)),
                };
                let mut tb = EventWriter::create(&dir)?;
                tb.add_session_start(state.progress.step)?;
                // Each member still to train gets an equal share of the time left.
                let deadline = self
                    .deadline_s
                    .map(|d| (d - session.elapsed().as_secs_f64()) / (members - m) as f64);
                state = semi::train_semi(
                    state,
                    &train_set,
                    &val_set,
                    &unlabeled,
                    self.inputs,
                    cfg,
                    deadline,
                    &mut tb,
                    save,
                    device,
                )?;
            }
            if m + 1 >= members {
                break;
            }
            // Saved at once, so a kill from here on does not train this member again.
            state = state.next_member(init.clone());
            save(&state)?;
        }
        let models = state.ensemble();
        let items: Vec<usize> = (0..self.inputs.test.len()).collect();
        let (test_probs, each) =
            ensemble_probs(&models, self.inputs, Set::Test, &items, cfg, false, device)?;
        let audit = audit_accuracy(&models, self.inputs, &audit_set, cfg, false, device)?;
        let (mut member_test_accuracy, mut member_audit_accuracy) = (Vec::new(), Vec::new());
        if members > 1 {
            for (model, probs) in models.iter().zip(&each) {
                member_test_accuracy.push(ConfusionMatrix::new(probs, self.test_labels).accuracy());
                let one = std::slice::from_ref(model);
                if let Some(a) = audit_accuracy(one, self.inputs, &audit_set, cfg, false, device)? {
                    member_audit_accuracy.push(a);
                }
            }
        }
        let p = &state.progress;
        let kept = match cfg.semi.keep {
            SemiKeep::Last => p.last.clone(),
            SemiKeep::BestValidation => p.best.clone(),
        };
        let validation_accuracy = kept.as_ref().map_or(f64::NAN, |b| b.validation_accuracy);
        let kept_step = kept.as_ref().map_or(0, |b| b.step);
        let after = ConfusionMatrix::new(&test_probs, self.test_labels).accuracy();
        let validation = if val_set.is_empty() {
            "no validation (trained on every bought label)".to_string()
        } else {
            format!(
                "validation accuracy {:.2}% (kept step {kept_step}) against {:.2}% before",
                100.0 * validation_accuracy,
                100.0 * self.validation_accuracy_before,
            )
        };
        let audit_text = against(
            "; audit accuracy",
            audit,
            self.audit_accuracy_before,
            "before",
        );
        let ensemble = match members {
            1 => String::new(),
            _ => format!(
                " ({members} members, their predictions averaged; each alone: test {}%)",
                member_test_accuracy
                    .iter()
                    .map(|a| format!("{:.2}", 100.0 * a))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        };
        log(
            None,
            &format!(
                "semi-supervised stage{ensemble}: {validation}{audit_text}; test accuracy {:.2}% \
                 against {:.2}% before (report only), {:.0} s",
                100.0 * after,
                100.0 * self.test_accuracy_before,
                p.seconds
            ),
        );
        let held_out = val_set.len() + audit_set.len();
        let passes_per_step =
            cfg.semi.unlabeled_batch() as f64 / (self.pool.size() - held_out).max(1) as f64;
        let summary = SemiSummary {
            method: "fixmatch".into(),
            steps: p.step,
            passes: p.step as f64 * passes_per_step,
            kept_step,
            bought_labels_trained: train_set.len(),
            validation_accuracy,
            test_accuracy_before: self.test_accuracy_before,
            validation_accuracy_before: self.validation_accuracy_before,
            audit_accuracy: audit,
            audit_accuracy_before: self.audit_accuracy_before,
            seconds: p.seconds,
            members,
            member_test_accuracy,
            member_audit_accuracy,
        };
        Ok((state, test_probs, summary))
    }
}

/// `"{what} A% against B% {then}"` for a log line, or nothing when either figure is missing (no
/// audit slice).
fn against(what: &str, a: Option<f64>, b: Option<f64>, then: &str) -> String {
    match (a, b) {
        (Some(a), Some(b)) => format!("{what} {:.2}% against {:.2}% {then}", 100.0 * a, 100.0 * b),
        _ => String::new(),
    }
}

/// The final predictions of a joined run: the mean class probabilities of this run's final
/// `ours` and the joined run's final models (each model counts once), on the test set (`test`:
/// this run's probabilities `[test * classes]` and the labels, report only) and on the audit slice
/// (`audit`: the slice and this run's accuracy on it). Returns the test probabilities, the audit
/// accuracy and the summary of each run alone.
fn join_ensemble<B: Backend>(
    joined: &JoinedRun,
    ours: &[Classifier<B>],
    inputs: &Inputs,
    cfg: &FinetuneConfig,
    test: (&[f32], &[u8]),
    audit: (&[Labeled], Option<f64>),
    device: &B::Device,
) -> Result<(Vec<f32>, Option<f64>, JoinSummary)> {
    let ((our_test, test_labels), (audit, our_audit_accuracy)) = (test, audit);
    let theirs = joined.final_models::<B>(device)?;
    let probs = |models: &[Classifier<B>], set: Set, items: &[usize]| -> Result<Vec<f32>> {
        let flip = cfg.semi.test_time_flip;
        Ok(ensemble_probs(models, inputs, set, items, cfg, flip, device)?.0)
    };
    let (n_ours, n_theirs) = (ours.len() as f32, theirs.len() as f32);
    let mix = |a: &[f32], b: &[f32]| -> Vec<f32> {
        a.iter()
            .zip(b)
            .map(|(a, b)| (n_ours * a + n_theirs * b) / (n_ours + n_theirs))
            .collect()
    };
    let test_items: Vec<usize> = (0..test_labels.len()).collect();
    let their_test = probs(&theirs, Set::Test, &test_items)?;
    let mixed_test = mix(our_test, &their_test);
    let (their_audit, mixed_audit) = if audit.is_empty() {
        (None, our_audit_accuracy)
    } else {
        let (items, labels): (Vec<usize>, Vec<u8>) = audit.iter().copied().unzip();
        let (ours_p, theirs_p) = (
            probs(ours, Set::Pool, &items)?,
            probs(&theirs, Set::Pool, &items)?,
        );
        let accuracy = |p: &[f32]| ConfusionMatrix::new(p, &labels).accuracy();
        (
            Some(accuracy(&theirs_p)),
            Some(accuracy(&mix(&ours_p, &theirs_p))),
        )
    };
    let test_accuracy = |p: &[f32]| ConfusionMatrix::new(p, test_labels).accuracy();
    let summary = JoinSummary {
        run: joined.dir.display().to_string(),
        models: ours.len(),
        joined_models: theirs.len(),
        test_accuracy_alone: test_accuracy(our_test),
        joined_test_accuracy: test_accuracy(&their_test),
        audit_accuracy_alone: our_audit_accuracy,
        joined_audit_accuracy: their_audit,
    };
    let audit_text = against(
        "audit accuracy",
        mixed_audit,
        our_audit_accuracy,
        &format!(
            "alone ({:.2}% the joined run's); ",
            100.0 * their_audit.unwrap_or(f64::NAN)
        ),
    );
    log(
        None,
        &format!(
            "joined with {}: {audit_text}test accuracy {:.2}% against {:.2}% alone ({:.2}% the \
             joined run's; report only)",
            joined.dir.display(),
            100.0 * test_accuracy(&mixed_test),
            100.0 * summary.test_accuracy_alone,
            100.0 * summary.joined_test_accuracy
        ),
    );
    Ok((mixed_test, mixed_audit, summary))
}

/// The accuracy of `models`' mean predictions on the audit slice `audit` (`None` when it is
/// empty): bought labels that nothing trains or validates on, for the report. `flip`: of the
/// test-time flip's predictions.
fn audit_accuracy<B: Backend>(
    models: &[Classifier<B>],
    inputs: &Inputs,
    audit: &[Labeled],
    cfg: &FinetuneConfig,
    flip: bool,
    device: &B::Device,
) -> Result<Option<f64>> {
    if audit.is_empty() {
        return Ok(None);
    }
    let (items, labels): (Vec<usize>, Vec<u8>) = audit.iter().copied().unzip();
    let (probs, _) = ensemble_probs(models, inputs, Set::Pool, &items, cfg, flip, device)?;
    Ok(Some(ConfusionMatrix::new(&probs, &labels).accuracy()))
}

/// The mean of `models`' class probabilities of `items` of `set` (`[items * classes]`), each
/// with the test-time flip when `flip` (an ensemble of stage members; one model: its own), and
/// each model's own probabilities.
fn ensemble_probs<B: Backend>(
    models: &[Classifier<B>],
    inputs: &Inputs,
    set: Set,
    items: &[usize],
    cfg: &FinetuneConfig,
    flip: bool,
    device: &B::Device,
) -> Result<(Vec<f32>, Vec<Vec<f32>>)> {
    let mut each = Vec::with_capacity(models.len());
    for model in models {
        let mut probs = score(model, inputs, set, items, cfg, false, 0, device)?.probs;
        if flip {
            probs = train::flip_averaged(model, inputs, set, items, &probs, cfg, device)?;
        }
        each.push(probs);
    }
    let mean = match each.as_slice() {
        [] => bail!("internal: an ensemble of no models"),
        [one] => one.clone(),
        all => {
            let k = all.len() as f32;
            (0..all[0].len())
                .map(|i| all.iter().map(|p| p[i]).sum::<f32>() / k)
                .collect()
        }
    };
    Ok((mean, each))
}

/// The classifier's probabilities on the whole test set: for the report, never for a decision.
fn score_test<B: Backend>(
    model: &Classifier<B>,
    inputs: &Inputs,
    cfg: &FinetuneConfig,
    device: &B::Device,
) -> Result<train::Scores> {
    let items: Vec<usize> = (0..inputs.test.len()).collect();
    score(model, inputs, Set::Test, &items, cfg, false, 0, device)
}

/// Opens the label database (checking that it belongs to this pool), or creates it from the
/// training label file on a fresh run.
fn open_label_db(
    path: &std::path::Path,
    cfg: &FinetuneConfig,
    pool_images: &FashionMnist,
    resume: bool,
    has_checkpoint: bool,
) -> Result<LabelDb> {
    let budget = cfg.labels.budget;
    if !path.exists() {
        // Without a checkpoint the run may have died before creating its database (nothing can
        // have been bought then); with one, the database existed and is gone.
        if resume && has_checkpoint {
            bail!(
                "the run's label database {} is missing: its bought labels are lost (start a new \
                 run without --resume)",
                path.display()
            );
        }
        return labels::import(path, &cfg.data.dir, cfg.data.limit, Some(budget));
    }
    let mut db = LabelDb::open(path)?;
    db.check_dataset(&DatasetId::of_train_images(pool_images))?;
    let spent = db.spent()?;
    if !resume && spent > 0 {
        bail!(
            "the label database {} already holds {spent} bought labels: pass --resume to continue \
             that run, or give a new --label-db",
            path.display()
        );
    }
    match db.budget()? {
        None => db.set_budget(budget)?,
        Some(b) if b < budget => bail!(
            "the label database {} allows {b} labels, fewer than --labels {budget}",
            path.display()
        ),
        Some(_) => {}
    }
    Ok(db)
}

/// Refuses a ledger that this plan could not have written.
fn check_ledger(pool: &Pool, sizes: &[u64]) -> Result<()> {
    for round in 0..pool.rounds() {
        let n = pool.bought_in(round).len() as u64;
        if sizes.get(round as usize) != Some(&n) {
            bail!(
                "the label database's ledger bought {n} labels in round {round}, but this plan \
                 buys {:?} there: it belongs to another run",
                sizes.get(round as usize)
            );
        }
    }
    Ok(())
}

/// Buys each group of picks under its strategy name, all in one database transaction, and
/// reloads the pool from the ledger.
fn buy(db: &mut LabelDb, pool: &mut Pool, groups: &[(&[Pick], &str)], round: u32) -> Result<()> {
    let purchases: Vec<Purchase> = groups
        .iter()
        .flat_map(|&(picks, strategy)| {
            picks.iter().map(move |p| Purchase {
                item: p.item as u64,
                round,
                strategy,
                score: p.score,
            })
        })
        .collect();
    db.query(&purchases)?;
    *pool = Pool::from_ledger(pool.size(), db.bought()?)?;
    Ok(())
}

/// A grid of the images bought in `round`, at the step of the labels spent after it.
fn log_purchase(
    tb: &mut EventWriter,
    pool: &Pool,
    images: &FashionMnist,
    round: u32,
    max: usize,
) -> Result<()> {
    let bought = pool.bought_in(round);
    log(
        None,
        &format!(
            "round {round}: bought {} labels ({} in all)",
            bought.len(),
            pool.spent()
        ),
    );
    if max > 0 {
        let tiles: Vec<Vec<f32>> = bought
            .iter()
            .take(max)
            .map(|b| images.image_f32(b.item as usize))
            .collect();
        let refs: Vec<&[f32]> = tiles.iter().map(|t| t.as_slice()).collect();
        let grid = image_grid(&refs, IMAGE_SIDE, IMAGE_SIDE, 16, 2);
        tb.add_image("labels/bought_images", &grid, pool.spent())?;
    }
    tb.flush()
}

/// Rows `rows` of a row-major `[n * dim]` matrix, in that order.
fn gather_rows(matrix: &[f32], dim: usize, rows: &[usize]) -> Vec<f32> {
    rows.iter()
        .flat_map(|&r| &matrix[r * dim..(r + 1) * dim])
        .copied()
        .collect()
}

/// `k` of `candidates` at random, drawn from the seeded `stream` (counter 0). With
/// `stream::VALIDATION_SLICE` this is the random validation slice: it depends on the seed and the
/// pool alone, and a larger slice extends a smaller one.
fn random_picks(candidates: &[usize], k: usize, seed: u64, stream: u64) -> Vec<Pick> {
    let mut c = candidates.to_vec();
    c.shuffle(&mut rng_for(seed, stream, 0));
    c.truncate(k);
    c.into_iter()
        .map(|item| Pick { item, score: None })
        .collect()
}

/// A fresh classifier for `cfg.model.freeze`: head only (frozen encoder, features precomputed),
/// or the pretrained encoder with its first blocks frozen (partial) or all trainable.
fn new_classifier<B: AutodiffBackend>(
    cfg: &FinetuneConfig,
    encoder: &Encoder<B>,
    feature_dim: usize,
    device: &B::Device,
) -> Classifier<B> {
    let encoder = match cfg.model.freeze {
        Freeze::Encoder => None,
        Freeze::Partial => Some(encoder.clone().freeze_early()),
        Freeze::None => Some(encoder.clone()),
    };
    Classifier::new(
        encoder,
        feature_dim,
        cfg.model.hidden,
        CLASS_NAMES.len(),
        device,
    )
}

/// A seeded Gaussian random projection of `features` (`n * dim`) to [`COLD_START_DIM`]
/// dimensions: distances survive (Johnson-Lindenstrauss) and k-means gets cheap.
fn project<B: Backend>(
    features: &[f32],
    dim: usize,
    seed: u64,
    device: &B::Device,
) -> Result<Vec<f32>> {
    let mut rng = rng_for(seed, stream::ACQUIRE, u64::MAX);
    let scale = 1.0 / (COLD_START_DIM as f32).sqrt();
    let m: Vec<f32> = (0..dim * COLD_START_DIM)
        .map(|_| StandardNormal.sample(&mut rng))
        .map(|v: f32| v * scale)
        .collect();
    let m = Tensor::<B, 2>::from_data(TensorData::new(m, [dim, COLD_START_DIM]), device);
    let n = features.len() / dim;
    let mut out = Vec::with_capacity(n * COLD_START_DIM);
    for start in (0..n).step_by(4096) {
        let end = (start + 4096).min(n);
        let x = Tensor::<B, 2>::from_data(
            TensorData::new(
                features[start * dim..end * dim].to_vec(),
                [end - start, dim],
            ),
            device,
        );
        out.extend(host_values(x.matmul(m.clone()))?);
    }
    Ok(out)
}

/// Writes this run's checkpoints: what identifies the run is fixed, the model and progress vary.
struct CheckpointWriter<'a> {
    path: &'a std::path::Path,
    cfg: &'a FinetuneConfig,
    method: &'a str,
    architecture: &'a serde_json::Value,
}

impl CheckpointWriter<'_> {
    /// The classifier trained on the labels of `pool`'s rounds, atomically replacing the last one.
    fn save<B: AutodiffBackend>(
        &self,
        model: &Classifier<B>,
        training: &RoundTraining,
        pool: &Pool,
        seconds: f64,
        semi: Option<&SemiState<B>>,
        finished: bool,
    ) -> Result<()> {
        let saved = Saved {
            plan: self.cfg.plan(),
            rounds_trained: pool.rounds(),
            training: training.clone(),
            seconds,
            semi: semi.map(|s| s.progress.clone()),
        };
        let mut blobs = vec![("model".into(), module_to_bytes::<B, _>(model.clone())?)];
        if let Some(state) = semi {
            let b = state.blobs()?;
            blobs.push(("semi_learned".into(), b.learned));
            blobs.push(("semi_model".into(), b.model));
            blobs.push(("semi_ema".into(), b.ema));
            blobs.push(("semi_best".into(), b.best));
            blobs.push(("semi_optimizer".into(), b.optimizer));
            if !b.losses.is_empty() {
                blobs.push(("semi_losses".into(), b.losses));
                blobs.push(("semi_pass".into(), b.pass));
            }
            for (m, bytes) in b.members.into_iter().enumerate() {
                blobs.push((format!("semi_member_{m}"), bytes));
            }
        }
        Checkpoint {
            header: CheckpointHeader {
                stage: STAGE.into(),
                method: self.method.into(),
                architecture: self.architecture.clone(),
                epoch: pool.rounds() as u64,
                batch_in_epoch: 0,
                global_step: pool.spent(),
                seed: self.cfg.train.seed,
                train_seconds: seconds,
                finished,
                frugal_version: env!("CARGO_PKG_VERSION").into(),
                extra: serde_json::to_value(saved)?,
            },
            blobs,
        }
        .save(self.path)
        .with_context(|| format!("cannot write checkpoint {}", self.path.display()))
    }
}
