//! `frugal finetune` end to end on real Fashion-MNIST slices: the ledger, the reports, resume
//! after kills at random moments.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use frugal::data::idx;
use frugal::labels::LabelDb;

/// A data dir (600 training images with labels, 300 test images) and a pretrained smoke encoder.
fn setup(root: &Path) -> (PathBuf, PathBuf) {
    let data = sliced_data_dir_with_labels(&root.join("data"), 600, 300);
    let out = run(&mut smoke(root, &data, "enc"));
    assert!(out.status.success(), "pretraining failed: {}", stderr(&out));
    (data, root.join("enc"))
}

/// `(item, round)` of every bought label, in purchase order, straight from the database.
fn ledger(db: &Path) -> Vec<(u64, u32)> {
    LabelDb::open(db)
        .unwrap()
        .bought()
        .unwrap()
        .iter()
        .map(|b| (b.item, b.round))
        .collect()
}

#[test]
fn finetune_reports_what_the_ledger_and_predictions_say() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let (data, enc) = setup(root);
    let out = run(&mut smoke_finetune(root, &data, &enc, "ft"));
    assert!(out.status.success(), "finetune failed: {}", stderr(&out));
    let run_dir = root.join("ft");
    let s = summary(&run_dir);

    // The ledger: exactly the budget, distinct items, rounds 0..4 of 15 each.
    let db = run_dir.join("labels.db");
    let rows = ledger(&db);
    assert_eq!(rows.len(), 60);
    let mut items: Vec<u64> = rows.iter().map(|r| r.0).collect();
    items.sort();
    items.dedup();
    assert_eq!(items.len(), 60, "an item was bought twice");
    for round in 0..4 {
        assert_eq!(rows.iter().filter(|r| r.1 == round).count(), 15);
    }
    assert_eq!(s["labels_bought"], 60);
    assert_eq!(LabelDb::open(&db).unwrap().spent().unwrap(), 60);

    // Accuracy recomputed from predictions.csv against the raw test label file.
    let labels = idx::read_labels(&data.join("t10k-labels-idx1-ubyte.gz"), 10).unwrap();
    let text = std::fs::read_to_string(run_dir.join("predictions.csv")).unwrap();
    let mut lines = text.lines();
    assert_eq!(lines.next(), Some("test_index,predicted,confidence"));
    let (mut n, mut correct) = (0, 0);
    for line in lines {
        let f: Vec<&str> = line.split(',').collect();
        let (i, p): (usize, u8) = (f[0].parse().unwrap(), f[1].parse().unwrap());
        let conf: f64 = f[2].parse().unwrap();
        assert!((0.1..=1.0).contains(&conf), "confidence {conf}");
        n += 1;
        correct += (labels[i] == p) as usize;
    }
    assert_eq!(n, 300);
    let acc = correct as f64 / n as f64;
    assert!((acc - s["test_accuracy"].as_f64().unwrap()).abs() < 1e-12);
    // 60 labels on a two-epoch encoder: above chance (10%; a collapsed head scores about that).
    assert!(acc > 0.2, "test accuracy {acc}");
    let per_class = s["per_class_accuracy"].as_object().unwrap();
    assert_eq!(per_class.len(), 10);
    let cm: Vec<Vec<u64>> = serde_json::from_value(s["confusion_matrix"].clone()).unwrap();
    assert_eq!(cm.iter().flatten().sum::<u64>(), 300);

    // One metrics row per trained round, the labels column growing by 15.
    let metrics = std::fs::read_to_string(run_dir.join("metrics.csv")).unwrap();
    let spent: Vec<u64> = metrics
        .lines()
        .skip(1)
        .map(|l| l.split(',').next().unwrap().parse().unwrap())
        .collect();
    assert_eq!(spent, vec![15, 30, 45, 60]);

    // The smoke pipeline logs every epoch (`report.epoch_log_seconds = 0`): per round, the last
    // epoch line is the round's last epoch in metrics.csv.
    let log = stderr(&out);
    for row in metrics.lines().skip(1) {
        let fields: Vec<&str> = row.split(',').collect();
        let (round, epochs): (u64, u64) = (fields[1].parse().unwrap(), fields[4].parse().unwrap());
        let prefix = format!("round {round}, epoch ");
        let logged: Vec<u64> = log
            .lines()
            .filter_map(|l| l.split_once(&prefix))
            .map(|(_, rest)| rest.split(':').next().unwrap().parse().unwrap())
            .collect();
        assert_eq!(logged, (1..=epochs).collect::<Vec<_>>(), "round {round}");
    }

    // Resuming a finished run changes nothing.
    let modified = |f: &str| {
        std::fs::metadata(run_dir.join(f))
            .unwrap()
            .modified()
            .unwrap()
    };
    let before = (modified("predictions.csv"), modified("summary.json"));
    let out = run(smoke_finetune(root, &data, &enc, "ft").arg("--resume"));
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("finished already"),
        "{}",
        stderr(&out)
    );
    assert_eq!(
        before,
        (modified("predictions.csv"), modified("summary.json"))
    );
    assert_eq!(ledger(&db).len(), 60);

    // `frugal labels status` reads the same database.
    let out = run(frugal().args(["labels", "status", "--label-db"]).arg(&db));
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("60"), "{text}");
}

/// Labels spent so far, or 0 while the database does not exist or is busy.
fn spent(db: &Path) -> u64 {
    LabelDb::open(db).and_then(|d| d.spent()).unwrap_or(0)
}

#[test]
fn killed_at_random_moments_resumes_without_buying_twice() {
    killed_and_resumed_buys_what_a_straight_run_buys(&[]);
}

/// The same with a random validation slice, bought in the first purchase beside the cold start.
/// 90 labels (a slice of 18, then 33, 48, 63, 78, 90 bought): as many purchases after the second
/// as the test above has, so a kill just after that one still lands before the run ends.
#[test]
fn killed_with_a_random_validation_slice_resumes_without_buying_twice() {
    killed_and_resumed_buys_what_a_straight_run_buys(&["--validation", "random", "--labels", "90"]);
}

/// A smoke finetune run (with `args`) killed at random moments and resumed each time buys the
/// labels an uninterrupted one buys, never one twice, and ends with its test accuracy.
fn killed_and_resumed_buys_what_a_straight_run_buys(args: &[&str]) {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let (data, enc) = setup(root);

    let t0 = Instant::now();
    let out = run(smoke_finetune(root, &data, &enc, "straight").args(args));
    assert!(out.status.success(), "{}", stderr(&out));
    let full_ms = t0.elapsed().as_millis() as u64;
    let straight = ledger(&root.join("straight/labels.db"));

    // Kill at pseudo-random moments (seeded by the clock, printed for a re-run), resume each time.
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos() as u64;
    println!("kill schedule seed: {seed}");
    let mut x = seed | 1;
    let mut next_delay = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        // Anywhere from startup to the end of a whole run.
        Duration::from_millis(full_ms / 20 + x % (full_ms * 2 / 3).max(1))
    };
    let db = root.join("killed/labels.db");
    let mut kills = 0;
    let mut first = true;
    for attempt in 0..40 {
        let mut cmd = smoke_finetune(root, &data, &enc, "killed");
        cmd.args(args);
        if !first {
            cmd.arg("--resume");
        }
        let mut child = cmd
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // Two kinds of kill points: a random moment (anywhere: loading, training, scoring), or
        // shortly after the next purchase lands in the ledger (the first two attempts, so that
        // every run is killed at least twice in the middle).
        let after_purchase = attempt < 2 || next_delay().as_millis() % 2 == 0;
        let spent_before = spent(&db);
        let mut deadline = if after_purchase {
            None
        } else {
            Some(Instant::now() + next_delay())
        };
        let extra = Duration::from_millis(next_delay().as_millis() as u64 % 40);
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break Some(status);
            }
            if deadline.is_none() && spent(&db) > spent_before {
                deadline = Some(Instant::now() + extra);
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                child.kill().unwrap(); // SIGKILL
                child.wait().unwrap();
                break None;
            }
            std::thread::sleep(Duration::from_millis(2));
        };
        match status {
            Some(status) => {
                let mut err = String::new();
                use std::io::Read;
                child
                    .stderr
                    .take()
                    .unwrap()
                    .read_to_string(&mut err)
                    .unwrap();
                if first && !db.exists() {
                    panic!("first run ended before creating its database: {err}");
                }
                assert!(status.success(), "run failed after {kills} kills: {err}");
                break;
            }
            None => {
                kills += 1;
                // Started at all? (A kill before the config was written leaves nothing to resume.)
                if first && !root.join("killed/config.toml").exists() {
                    std::fs::remove_dir_all(root.join("killed")).ok();
                    continue;
                }
                first = false;
                if db.exists() {
                    if let Ok(rows) = LabelDb::open(&db).and_then(|d| d.bought()) {
                        let mut items: Vec<u64> = rows.iter().map(|b| b.item).collect();
                        items.sort();
                        items.dedup();
                        assert_eq!(items.len(), rows.len(), "an item was bought twice");
                        assert!(rows.len() <= straight.len());
                    }
                }
            }
        }
    }
    println!("{kills} kills");
    assert!(
        kills >= 2,
        "only {kills} kills happened: the schedule is too slow"
    );
    assert_eq!(
        summary(&root.join("killed"))["labels_bought"],
        summary(&root.join("straight"))["labels_bought"]
    );
    assert_eq!(
        ledger(&db),
        straight,
        "the killed and resumed run bought other labels than the uninterrupted one"
    );
    assert_eq!(
        summary(&root.join("killed"))["test_accuracy"],
        summary(&root.join("straight"))["test_accuracy"]
    );
}

/// `--freeze partial` trains the last conv block and the head only; `--freeze none` trains the whole
/// encoder too. Read back from the finetune checkpoint and compared with the pretrained encoder.
#[test]
fn freeze_modes_train_the_right_weights() {
    use burn::module::Module;
    use frugal::checkpoint::{record_from_bytes, Checkpoint};
    use frugal::finetune::encoder::load_encoder;
    use frugal::models::{named_params, Classifier};
    type B = burn::backend::Flex;
    let device = burn::backend::flex::FlexDevice;

    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let (data, enc) = setup(root);
    let pretrained = load_encoder::<B>(&enc, &device).unwrap();
    let before = named_params(&pretrained.encoder).unwrap();
    for (mode, trained) in [
        ("partial", vec!["conv3.weight", "conv3.bias"]),
        ("none", vec!["conv1.weight", "conv2.weight", "conv3.weight"]),
    ] {
        let out = run(smoke_finetune(root, &data, &enc, mode)
            .args(["--freeze", mode, "--labels", "30", "--epochs", "3"]));
        assert!(out.status.success(), "{mode}: {}", stderr(&out));
        let path = root.join(mode).join("checkpoint.bin");
        let ck = Checkpoint::load(&path).unwrap();
        let record = record_from_bytes::<B, _>(ck.blob(&path, "model").unwrap(), &device).unwrap();
        let model = Classifier::<B>::new(
            Some(pretrained.encoder.clone()),
            pretrained.feature_dim,
            32,
            10,
            &device,
        )
        .load_record(record);
        let after = named_params(&model.encoder.unwrap()).unwrap();
        for ((name, b), (name2, a)) in before.iter().zip(&after) {
            assert_eq!(name, name2);
            let changed = a != b;
            assert_eq!(
                changed,
                trained.iter().any(|t| name.ends_with(t)) || (mode == "none"),
                "{mode}: {name} changed: {changed}"
            );
        }
    }
}

/// `--validation random`: a seeded random slice of the pool, bought with the first batch and
/// recorded in the ledger as `validation`, is the same for two strategies and cold starts with the
/// same seed, validates, and never trains; the plan records it, so a resume without it is refused.
#[test]
fn a_random_validation_slice_is_shared_by_strategies_and_bought_once() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let (data, enc) = setup(root);
    let random_slice = ["--validation", "random", "--validation-fraction", "0.25"];
    let mut slices = Vec::new();
    for (name, plan) in [
        ("margin", ["--strategy", "margin", "--cold-start", "kmeans"]),
        (
            "kcenter",
            ["--strategy", "margin-kcenter", "--cold-start", "random"],
        ),
    ] {
        let out = run(smoke_finetune(root, &data, &enc, name)
            .args(random_slice)
            .args(plan));
        assert!(out.status.success(), "{name}: {}", stderr(&out));
        let run_dir = root.join(name);
        let bought = LabelDb::open(&run_dir.join("labels.db"))
            .unwrap()
            .bought()
            .unwrap();
        assert_eq!(bought.len(), 60, "{name}: the budget, slice included");
        let mut items: Vec<u64> = bought.iter().map(|b| b.item).collect();
        items.sort();
        items.dedup();
        assert_eq!(items.len(), 60, "{name}: an item was bought twice");
        let slice: Vec<u64> = bought
            .iter()
            .filter(|b| b.strategy == "validation")
            .map(|b| b.item)
            .collect();
        assert_eq!(slice.len(), 15, "{name}: 25% of 60");
        assert!(bought
            .iter()
            .filter(|b| b.strategy == "validation")
            .all(|b| b.round == 0));
        // Round 0 is the slice and the 15 of the cold start; later rounds buy 15 each.
        assert_eq!(bought.iter().filter(|b| b.round == 0).count(), 30);
        let s = summary(&run_dir);
        assert_eq!(s["train_labels"], 45);
        assert_eq!(s["validation_labels"], 15);
        let metrics = std::fs::read_to_string(run_dir.join("metrics.csv")).unwrap();
        let rows: Vec<Vec<String>> = metrics
            .lines()
            .skip(1)
            .map(|l| l.split(',').map(str::to_string).collect())
            .collect();
        let spent: Vec<&str> = rows.iter().map(|r| r[0].as_str()).collect();
        assert_eq!(spent, ["30", "45", "60"]);
        assert!(rows.iter().all(|r| r[3] == "15"), "{name}: {metrics}");
        slices.push(slice);
    }
    let mut sorted = slices.clone();
    sorted.iter_mut().for_each(|s| s.sort());
    assert_eq!(
        sorted[0], sorted[1],
        "one seed, one slice, whatever the strategy"
    );

    // A resume must keep the plan: without the slice it is another run.
    let out =
        run(smoke_finetune(root, &data, &enc, "margin").args(["--resume", "--strategy", "margin"]));
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("another label plan"),
        "{}",
        stderr(&out)
    );

    // A budget the slice and the first batch do not fit in is refused before anything is bought.
    let out = run(smoke_finetune(root, &data, &enc, "small")
        .args(["--labels", "18"])
        .args(random_slice));
    assert!(!out.status.success());
    assert!(stderr(&out).contains("random slice (5"), "{}", stderr(&out));
    assert!(!root.join("small/labels.db").exists());
}
