//! The semi-supervised stage of `frugal finetune` (`--semi fixmatch`) end to end on real
//! Fashion-MNIST slices: it trains the encoder, buys nothing, resumes exactly after a kill (with
//! selection by loss, whose passes depend on the losses, and the moving-average teacher), the time
//! budget shortens it, and a refit trains on every bought label (judged, as is the test-time flip,
//! on an audit slice).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;
use frugal::labels::LabelDb;

/// The smoke finetune pipeline with a small semi-supervised stage that checkpoints at every step.
fn semi_pipeline(root: &Path) -> PathBuf {
    let base = std::fs::read_to_string(repo().join("pipelines/smoke-finetune.toml")).unwrap();
    let text = format!(
        "{base}\n[semi]\nmethod = \"fixmatch\"\nepochs = 4.0\nlabeled_batch = 8\n\
         unlabeled_ratio = 4\nthreshold = 0.5\neval_every = 5\nwarmup_steps = 5\n\
         checkpoint_minutes = 0.0001\n"
    );
    let path = root.join("semi.toml");
    std::fs::write(&path, text).unwrap();
    path
}

fn setup(root: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let data = sliced_data_dir_with_labels(&root.join("data"), 600, 300);
    let out = run(&mut smoke(root, &data, "enc"));
    assert!(out.status.success(), "pretraining failed: {}", stderr(&out));
    (data, root.join("enc"), semi_pipeline(root))
}

fn semi_finetune(root: &Path, data: &Path, enc: &Path, pipeline: &Path, name: &str) -> Command {
    finetune_with(pipeline, root, data, enc, name)
}

/// The stage with selection by loss (passes after the first train on half the pool) and the
/// moving average as the teacher, labelling through mirrored views: the settings whose state a
/// resume must restore, and every path of the pseudo-labels.
fn selective(root: &Path, data: &Path, enc: &Path, pipeline: &Path, name: &str) -> Command {
    let mut c = semi_finetune(root, data, enc, pipeline, name);
    c.args([
        "--semi-select",
        "0.5",
        "--semi-teacher",
        "ema",
        "--pseudo-label-flip",
    ]);
    c
}

/// Whether `dir` holds a TensorBoard event file.
fn has_events(dir: &Path) -> bool {
    std::fs::read_dir(dir).unwrap().any(|e| {
        e.unwrap()
            .file_name()
            .to_string_lossy()
            .starts_with("events.out")
    })
}

/// Starts `cmd` (a run writing to `run_dir`) and kills it inside the stage, once its checkpoint
/// shows member `member` unfinished with at least `step` steps done. Returns those steps; fails
/// if the run ends first or gets nowhere in 5 minutes.
fn kill_in_stage(cmd: &mut Command, run_dir: &Path, member: u64, step: u64) -> u64 {
    kill_when(cmd, run_dir, Duration::ZERO, |ck| {
        let semi = ck.header.extra.get("semi")?;
        let done = semi["step"].as_u64()?;
        (semi["member"].as_u64().unwrap_or(0) == member
            && done >= step
            && semi["finished"].as_bool() == Some(false))
        .then_some(done)
    })
    .expect("finished before the kill")
}

#[test]
fn semi_stage_trains_the_encoder_buys_nothing_and_resumes_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let (data, enc, pipeline) = setup(root);

    let out = run(&mut selective(root, &data, &enc, &pipeline, "straight"));
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("294 images of highest loss"),
        "{}",
        stderr(&out)
    );
    assert!(
        stderr(&out)
            .contains("pseudo-labels from the moving average's weak views and their mirrors"),
        "{}",
        stderr(&out)
    );
    let s = summary(&root.join("straight"));
    assert_eq!(s["config"]["semi"]["teacher"], "ema");
    assert_eq!(s["config"]["semi"]["pseudo_label_flip"], true);
    let semi = &s["semi"];
    // 600 pool images less 12 validation ones, 32 per step: 19 steps a pass; 4 passes, the last
    // three over half the pool: 2.5 full passes.
    assert_eq!(semi["steps"], 48, "{semi}");
    assert!(semi["kept_step"].as_u64().unwrap() <= 48);
    assert_eq!(semi["bought_labels_trained"], 48);
    assert!(semi["test_accuracy_before"].as_f64().is_some());
    // Pseudo-labels are never bought: the ledger holds the budget, no more.
    let db = LabelDb::open(&root.join("straight/labels.db")).unwrap();
    assert_eq!(db.spent().unwrap(), 60);
    assert_eq!(s["labels_bought"], 60);
    // The stage's TensorBoard run exists next to the rounds'.
    assert!(has_events(&root.join("straight/semi")));

    // Killed in the middle of the stage (in a pass chosen by loss), resumed: the same final model.
    let run_dir = root.join("killed");
    let killed_at = kill_in_stage(
        &mut selective(root, &data, &enc, &pipeline, "killed"),
        &run_dir,
        0,
        21,
    );
    assert!(killed_at < 48);
    let out = run(selective(root, &data, &enc, &pipeline, "killed").arg("--resume"));
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("resuming at step"),
        "{}",
        stderr(&out)
    );
    let k = summary(&run_dir);
    assert_eq!(k["semi"]["steps"], 48);
    assert_eq!(k["semi"]["kept_step"], semi["kept_step"]);
    assert_eq!(
        k["semi"]["validation_accuracy"],
        semi["validation_accuracy"]
    );
    assert_eq!(k["test_accuracy"], s["test_accuracy"]);
    assert_eq!(
        std::fs::read_to_string(run_dir.join("predictions.csv")).unwrap(),
        std::fs::read_to_string(root.join("straight/predictions.csv")).unwrap()
    );
    assert_eq!(
        LabelDb::open(&run_dir.join("labels.db"))
            .unwrap()
            .spent()
            .unwrap(),
        60
    );
}

#[test]
fn time_budget_shortens_the_stage() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let (data, enc, pipeline) = setup(root);
    // A budget the rounds alone use up: the stage stops once its step rate is measured.
    // Refit: the validation slice trains too, and the stage reports no validation.
    let out = run(semi_finetune(root, &data, &enc, &pipeline, "short").args([
        "--time-budget",
        "0.001",
        "--semi-refit",
    ]));
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("time budget"), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("60 bought training labels"),
        "{}",
        stderr(&out)
    );
    let s = summary(&root.join("short"));
    assert_eq!(s["semi"]["steps"], 20, "{}", s["semi"]);
    assert_eq!(s["semi"]["bought_labels_trained"], 60);
    assert!(s["semi"]["validation_accuracy"].is_null(), "{}", s["semi"]);
    assert_eq!(s["labels_bought"], 60);
    // A finished run with no validation figures reads back as finished.
    let out = run(semi_finetune(root, &data, &enc, &pipeline, "short").args([
        "--time-budget",
        "0.001",
        "--semi-refit",
        "--resume",
    ]));
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("finished"), "{}", stderr(&out));

    let out = run(semi_finetune(root, &data, &enc, &pipeline, "bad").args(["--time-budget", "0"]));
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("--time-budget"), "{}", stderr(&out));

    // A refit has no validation to choose the best weights by.
    let text = std::fs::read_to_string(&pipeline)
        .unwrap()
        .replace("[semi]\n", "[semi]\nkeep = \"best-validation\"\n");
    let best = root.join("best.toml");
    std::fs::write(&best, text).unwrap();
    let out = run(semi_finetune(root, &data, &enc, &best, "bad").args(["--semi-refit"]));
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("semi.keep = \"last\""),
        "{}",
        stderr(&out)
    );
    // `--semi-refit false` turns off a refit the config file asks for.
    let text = std::fs::read_to_string(&best)
        .unwrap()
        .replace("[semi]\n", "[semi]\ntrain_on_validation = true\n");
    std::fs::write(&best, text).unwrap();
    let out = run(&mut semi_finetune(root, &data, &enc, &best, "bad"));
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let out = run(semi_finetune(root, &data, &enc, &best, "kept").args([
        "--semi-refit",
        "false",
        "--time-budget",
        "0.001",
    ]));
    assert!(out.status.success(), "{}", stderr(&out));
    let s = summary(&root.join("kept"));
    assert_eq!(s["semi"]["bought_labels_trained"], 48, "{}", s["semi"]);
    assert!(s["semi"]["validation_accuracy"].is_f64(), "{}", s["semi"]);
}

#[test]
fn an_audit_slice_judges_a_refit_without_being_trained_on() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let (data, enc, pipeline) = setup(root);
    // 75 labels, a fifth of them the audit slice: the strategy's rounds are the smoke run's 60.
    let out = run(semi_finetune(root, &data, &enc, &pipeline, "audit").args([
        "--labels",
        "75",
        "--validation",
        "audit",
        "--validation-fraction",
        "0.2",
        "--semi-refit",
        "--test-time-flip",
    ]));
    assert!(out.status.success(), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("an audit slice of 15"), "{err}");
    assert!(err.contains("test-time flip: audit accuracy"), "{err}");
    assert!(err.contains("60 bought training labels"), "{err}");
    let run_dir = root.join("audit");
    let bought = LabelDb::open(&run_dir.join("labels.db"))
        .unwrap()
        .bought()
        .unwrap();
    assert_eq!(bought.len(), 75);
    let audit: Vec<u64> = bought
        .iter()
        .filter(|b| b.strategy == "audit")
        .map(|b| b.item)
        .collect();
    assert_eq!(audit.len(), 15);
    assert!(bought
        .iter()
        .filter(|b| b.strategy == "audit")
        .all(|b| b.round == 0));
    let mut items: Vec<u64> = bought.iter().map(|b| b.item).collect();
    items.sort();
    items.dedup();
    assert_eq!(items.len(), 75, "an item was bought twice");

    // Rounds: train + validation are the strategy's labels only, validation a fifth of them.
    let metrics = std::fs::read_to_string(run_dir.join("metrics.csv")).unwrap();
    let mut lines = metrics.lines();
    assert!(
        lines.next().unwrap().ends_with(",audit_accuracy"),
        "{metrics}"
    );
    let rows: Vec<Vec<&str>> = lines.map(|l| l.split(',').collect()).collect();
    let spent: Vec<&str> = rows.iter().map(|r| r[0]).collect();
    assert_eq!(spent, ["30", "45", "60", "75"]);
    for (r, strategy_labels) in rows.iter().zip([15, 30, 45, 60]) {
        let train: usize = r[2].parse().unwrap();
        let val: usize = r[3].parse().unwrap();
        assert_eq!(train + val, strategy_labels, "{metrics}");
        let a: f64 = r[11].parse().unwrap();
        assert!((0.0..=1.0).contains(&a), "{metrics}");
        assert!(
            ((a * 15.0).round() - a * 15.0).abs() < 1e-3,
            "{a}: not k/15"
        );
    }

    // The refit trains on the 60, never on the audit slice, which judges before and after.
    let s = summary(&run_dir);
    assert_eq!(s["audit_labels"], 15);
    assert_eq!(
        s["train_labels"].as_u64().unwrap() + s["validation_labels"].as_u64().unwrap(),
        60
    );
    assert_eq!(s["semi"]["bought_labels_trained"], 60);
    let after = s["semi"]["audit_accuracy"].as_f64().unwrap();
    assert!(
        ((after * 15.0).round() - after * 15.0).abs() < 1e-3,
        "{after}"
    );
    // The test-time flip judges itself on the same slice: the final figures are the flipped
    // predictions', the summary keeps the same model's figures without it.
    let flip = &s["test_time_flip"];
    assert_eq!(flip["audit_accuracy_without"].as_f64(), Some(after));
    let flipped = s["audit_accuracy"].as_f64().unwrap();
    assert!(
        ((flipped * 15.0).round() - flipped * 15.0).abs() < 1e-3,
        "{flipped}"
    );
    let test_without = flip["test_accuracy_without"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&test_without), "{s}");
    assert!((0.0..=1.0).contains(&s["test_accuracy"].as_f64().unwrap()));
    assert_eq!(s["config"]["semi"]["test_time_flip"], true);
    let before = s["semi"]["audit_accuracy_before"].as_f64().unwrap();
    assert_eq!(
        format!("{before:.5}"),
        rows[3][11],
        "the last round's figure"
    );

    // Killed in the stage and resumed: the audit slice is not bought again, and the run ends
    // where the uninterrupted one did.
    let audit_run = |name: &str| {
        let mut c = semi_finetune(root, &data, &enc, &pipeline, name);
        c.args([
            "--labels",
            "75",
            "--validation",
            "audit",
            "--validation-fraction",
            "0.2",
            "--semi-refit",
            "--test-time-flip",
        ]);
        c
    };
    let killed_dir = root.join("audit-killed");
    kill_in_stage(&mut audit_run("audit-killed"), &killed_dir, 0, 10);
    let out = run(audit_run("audit-killed").arg("--resume"));
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("resuming at step"),
        "{}",
        stderr(&out)
    );
    let resumed = LabelDb::open(&killed_dir.join("labels.db"))
        .unwrap()
        .bought()
        .unwrap();
    assert_eq!(resumed.len(), 75, "a label was bought again");
    let ledger = |b: &[frugal::labels::BoughtLabel]| -> Vec<(u64, String)> {
        b.iter().map(|b| (b.item, b.strategy.clone())).collect()
    };
    assert_eq!(ledger(&resumed), ledger(&bought));
    let k = summary(&killed_dir);
    for key in ["audit_accuracy", "test_accuracy"] {
        assert_eq!(k[key], s[key], "{key}");
    }
    assert_eq!(k["semi"]["audit_accuracy"], s["semi"]["audit_accuracy"]);
    assert_eq!(
        std::fs::read_to_string(killed_dir.join("predictions.csv")).unwrap(),
        std::fs::read_to_string(run_dir.join("predictions.csv")).unwrap()
    );
}

#[test]
fn stage_members_average_their_predictions_and_resume_inside_a_member() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let (data, enc, pipeline) = setup(root);
    let members = |name: &str, k: &str| {
        let mut c = semi_finetune(root, &data, &enc, &pipeline, name);
        c.args(["--test-time-flip", "--semi-members", k]);
        c
    };
    let out = run(&mut members("one", "1"));
    assert!(out.status.success(), "{}", stderr(&out));
    let one = summary(&root.join("one"));
    assert_eq!(one["semi"]["members"], 1);
    assert!(one["semi"].get("member_test_accuracy").is_none());
    assert!(!std::fs::read_to_string(root.join("one/config.toml"))
        .unwrap()
        .contains("members"));

    let out = run(&mut members("two", "2"));
    assert!(out.status.success(), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("member 2 of 2"), "{err}");
    assert!(
        err.contains("2 members, their predictions averaged"),
        "{err}"
    );
    let two = summary(&root.join("two"));
    let semi = &two["semi"];
    assert_eq!(semi["members"], 2);
    assert_eq!(two["config"]["semi"]["members"], 2);
    let each = semi["member_test_accuracy"].as_array().unwrap();
    assert_eq!(each.len(), 2);
    // The first member is the one-member stage; the second has its own stream.
    assert_eq!(
        each[0].as_f64(),
        one["test_time_flip"]["test_accuracy_without"].as_f64()
    );
    assert_ne!(
        std::fs::read_to_string(root.join("two/predictions.csv")).unwrap(),
        std::fs::read_to_string(root.join("one/predictions.csv")).unwrap(),
        "the second member changed nothing"
    );
    assert_eq!(semi["steps"], one["semi"]["steps"]);
    assert!(semi["seconds"].as_f64().unwrap() > one["semi"]["seconds"].as_f64().unwrap());
    assert_eq!(two["labels_bought"], 60);
    assert!(has_events(&root.join("two/semi/member-2")));

    // Killed inside the second member and resumed: the first is not trained again, and the run
    // ends where the uninterrupted one did.
    let run_dir = root.join("two-killed");
    kill_in_stage(&mut members("two-killed", "2"), &run_dir, 1, 5);
    let out = run(members("two-killed", "2").arg("--resume"));
    assert!(out.status.success(), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("member 2 of 2"), "{err}");
    assert!(
        !err.contains("member 1 of 2"),
        "the first member trained again: {err}"
    );
    assert!(err.contains("resuming at step"), "{err}");
    let k = summary(&run_dir);
    assert_eq!(k["test_accuracy"], two["test_accuracy"]);
    assert_eq!(
        k["semi"]["member_test_accuracy"],
        semi["member_test_accuracy"]
    );
    assert_eq!(
        std::fs::read_to_string(run_dir.join("predictions.csv")).unwrap(),
        std::fs::read_to_string(root.join("two/predictions.csv")).unwrap()
    );

    // At least one member (without the stage the flag is refused: tests/cli_errors.rs).
    let out = run(&mut members("bad", "0"));
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("semi.members"), "{}", stderr(&out));
}

#[test]
fn a_joined_run_trains_a_second_encoder_on_the_same_bought_labels_and_averages_both() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let (data, enc, pipeline) = setup(root);
    // The second encoder: another pretraining method, another architecture.
    let out = run(&mut smoke_simclr(root, &data, "enc2"));
    assert!(out.status.success(), "{}", stderr(&out));
    let enc2 = root.join("enc2");
    let labels = |c: &mut Command, n: &str| {
        c.args([
            "--labels",
            n,
            "--validation",
            "audit",
            "--validation-fraction",
            "0.2",
            "--test-time-flip",
        ]);
    };
    let mut base = semi_finetune(root, &data, &enc, &pipeline, "base");
    labels(&mut base, "75");
    let out = run(&mut base);
    assert!(out.status.success(), "{}", stderr(&out));
    let b = summary(&root.join("base"));

    let joined = |name: &str, n: &str| {
        let mut c = semi_finetune(root, &data, &enc2, &pipeline, name);
        labels(&mut c, n);
        c.arg("--join").arg(root.join("base"));
        c
    };
    let out = run(&mut joined("joined", "75"));
    assert!(out.status.success(), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("its bought labels copied"), "{err}");
    assert!(err.contains("joined with"), "{err}");
    assert!(
        !err.contains("round 1: bought"),
        "the joined run bought labels: {err}"
    );
    // The same labels, bought once by the first run and recorded in both ledgers.
    let ledger = |dir: &str| -> Vec<(u64, u32, String)> {
        LabelDb::open(&root.join(dir).join("labels.db"))
            .unwrap()
            .bought()
            .unwrap()
            .into_iter()
            .map(|b| (b.item, b.round, b.strategy))
            .collect()
    };
    assert_eq!(ledger("joined"), ledger("base"));
    assert_eq!(ledger("joined").len(), 75);
    let j = summary(&root.join("joined"));
    assert_eq!(j["labels_bought"], 75);
    let join = &j["join"];
    assert_eq!(join["models"], 1);
    assert_eq!(join["joined_models"], 1);
    // The joined run's model, read from its checkpoint, predicts what it predicted in its run.
    assert_eq!(join["joined_test_accuracy"], b["test_accuracy"], "{join}");
    assert_eq!(join["joined_audit_accuracy"], b["audit_accuracy"], "{join}");
    assert_ne!(
        std::fs::read_to_string(root.join("joined/predictions.csv")).unwrap(),
        std::fs::read_to_string(root.join("base/predictions.csv")).unwrap(),
        "the second encoder changed nothing"
    );
    for key in ["test_accuracy", "audit_accuracy"] {
        let v = j[key].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&v), "{key}: {j}");
    }

    // Killed in its stage and resumed: the ledger is not copied again, the end is the same.
    let killed = root.join("joined-killed");
    kill_in_stage(&mut joined("joined-killed", "75"), &killed, 0, 5);
    let out = run(joined("joined-killed", "75").arg("--resume"));
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(!stderr(&out).contains("copied"), "{}", stderr(&out));
    assert_eq!(ledger("joined-killed"), ledger("base"));
    let k = summary(&killed);
    assert_eq!(k["test_accuracy"], j["test_accuracy"]);
    assert_eq!(k["join"], j["join"]);

    // Another label plan, a run that is no finetune run, a run without the stage: refused.
    let mut other_plan = joined("other-plan", "90");
    let mut no_run = semi_finetune(root, &data, &enc2, &pipeline, "no-run");
    labels(&mut no_run, "75");
    no_run.args(["--join", "nowhere"]);
    // A run that has a config but no checkpoint yet (killed before its first round ended).
    let untrained = root.join("untrained");
    std::fs::create_dir(&untrained).unwrap();
    std::fs::copy(root.join("base/config.toml"), untrained.join("config.toml")).unwrap();
    std::fs::copy(root.join("base/labels.db"), untrained.join("labels.db")).unwrap();
    let mut not_trained = semi_finetune(root, &data, &enc2, &pipeline, "not-trained");
    labels(&mut not_trained, "75");
    not_trained.arg("--join").arg(&untrained);
    let mut no_stage = semi_finetune(root, &data, &enc2, &pipeline, "no-stage");
    no_stage.args(["--labels", "75", "--semi", "none", "--join"]);
    no_stage.arg(root.join("base"));
    for (name, cmd, says) in [
        ("other-plan", &mut other_plan, "another plan"),
        ("no-run", &mut no_run, "not a finetune run"),
        ("not-trained", &mut not_trained, "has not trained yet"),
        ("no-stage", &mut no_stage, "--join averages"),
    ] {
        let out = run(cmd);
        assert_eq!(out.status.code(), Some(1), "{name}: {}", stderr(&out));
        assert!(stderr(&out).contains(says), "{name}: {}", stderr(&out));
        assert!(!root.join(name).join("labels.db").exists(), "{name}");
    }

    // The joined run's encoder pretrained again, as another model: its final models no longer fit.
    std::fs::remove_dir_all(&enc).unwrap();
    let out = run(&mut smoke_simclr(root, &data, "enc"));
    assert!(out.status.success(), "{}", stderr(&out));
    let out = run(&mut joined("encoder-changed", "75"));
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("has changed since"),
        "{}",
        stderr(&out)
    );
}
