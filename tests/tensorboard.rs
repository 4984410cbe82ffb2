//! What frugal writes, read back by real TensorBoard (from PyPI, installed into .venv by
//! scripts/test.sh): scalar tags, steps and values, image sizes, histograms, projector files.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use serde_json::Value;

fn python() -> PathBuf {
    let p = std::env::var_os("FRUGAL_TB_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join(".venv/bin/python"));
    assert!(
        p.exists(),
        "{} not found: run the tests through scripts/test.sh, which installs TensorBoard into \
         .venv (or set FRUGAL_TB_PYTHON to a python that has it)",
        p.display()
    );
    p
}

/// TensorBoard's view of a run directory (see scripts/check_tensorboard.py).
fn tensorboard_view(run_dir: &Path) -> Value {
    let out = std::process::Command::new(python())
        .arg(repo().join("scripts/check_tensorboard.py"))
        .arg(run_dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn csv_column(run_dir: &Path, name: &str) -> Vec<(u64, f32)> {
    let text = std::fs::read_to_string(run_dir.join("metrics.csv")).unwrap();
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap().split(',').collect();
    let col = header.iter().position(|h| *h == name).unwrap();
    lines
        .map(|l| {
            let cells: Vec<&str> = l.split(',').collect();
            (cells[0].parse().unwrap(), cells[col].parse().unwrap())
        })
        .collect()
}

#[test]
fn tensorboard_reads_scalars_images_histograms_and_projector() {
    let tmp = tempfile::tempdir().unwrap();
    let data = sliced_data_dir(&tmp.path().join("data"), 512, 100);
    let run_dir = tmp.path().join("tb");
    // A run that died before its first checkpoint left its events here (another seed, so other
    // values); the fresh start must hide them from TensorBoard.
    let out = run(smoke(tmp.path(), &data, "dead").args(["--seed", "99"]));
    assert!(out.status.success(), "{}", stderr(&out));
    std::fs::create_dir_all(&run_dir).unwrap();
    for entry in std::fs::read_dir(tmp.path().join("dead")).unwrap() {
        let path = entry.unwrap().path();
        if path
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("events.out")
        {
            std::fs::copy(&path, run_dir.join(path.file_name().unwrap())).unwrap();
        }
    }
    let out = run(&mut smoke(tmp.path(), &data, "tb"));
    assert!(out.status.success(), "{}", stderr(&out));
    let tb = tensorboard_view(&run_dir);

    // Scalars: every step 1..=16 (smoke: 512 images, batch 64, 2 epochs, logged every step), with
    // the values of metrics.csv.
    let scalars = tb["scalars"].as_object().unwrap();
    let mut tags: Vec<&str> = scalars.keys().map(|s| s.as_str()).collect();
    tags.sort();
    assert_eq!(
        tags,
        [
            "epoch/kl",
            "epoch/loss",
            "epoch/reconstruction",
            "loss/kl",
            "loss/reconstruction",
            "loss/total",
            "train/images_per_second",
            "train/learning_rate"
        ]
    );
    for (tag, column) in [
        ("loss/total", "loss"),
        ("loss/reconstruction", "reconstruction"),
        ("loss/kl", "kl"),
        ("train/learning_rate", "learning_rate"),
    ] {
        let from_tb: Vec<(u64, f32)> = scalars[tag]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| (e[0].as_u64().unwrap(), e[1].as_f64().unwrap() as f32))
            .collect();
        let from_csv = csv_column(&run_dir, column);
        assert_eq!(from_tb.len(), 16, "{tag}");
        assert_eq!(from_tb, from_csv, "{tag}");
    }
    let epoch_steps: Vec<u64> = scalars["epoch/loss"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e[0].as_u64().unwrap())
        .collect();
    assert_eq!(epoch_steps, [8, 16]);
    // The loss went down.
    let loss = &scalars["loss/total"];
    assert!(loss[15][1].as_f64().unwrap() < loss[0][1].as_f64().unwrap());

    // Images: the input/reconstruction grid before training and after each epoch; 16 images in
    // rows of 8 pairs -> 8 x 4 tiles of 28 px with 2 px gaps.
    let images = &tb["images"]["reconstructions"];
    let steps: Vec<u64> = images
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e[0].as_u64().unwrap())
        .collect();
    assert_eq!(steps, [0, 8, 16]);
    for e in images.as_array().unwrap() {
        assert_eq!(
            (e[1].as_u64(), e[2].as_u64()),
            (Some(8 * 28 + 9 * 2), Some(4 * 28 + 5 * 2))
        );
        assert_eq!(
            e[3],
            serde_json::json!([8 * 28 + 9 * 2, 4 * 28 + 5 * 2]),
            "PNG size"
        );
    }

    // Histograms: one per weight tensor, with as many values as the tensor has.
    let histos = tb["histograms"].as_object().unwrap();
    let conv1 = &histos["weights/encoder.conv1.weight"];
    assert_eq!(conv1.as_array().unwrap().len(), 3);
    assert_eq!(conv1[0][1].as_f64(), Some((8 * 3 * 3) as f64));
    assert_eq!(conv1[0][4].as_u64(), Some(20), "buckets");
    assert_eq!(
        histos["weights/mu.weight"][2][1].as_f64(),
        Some((16 * 49 * 8) as f64)
    );
    assert!(histos.len() >= 14, "{:?}", histos.keys());

    // Projector: 64 test images, 8-dimensional latents, labels and class names, an 8x8 sprite.
    let p = &tb["projectors"]["vae_latent_mean"];
    assert_eq!(p["dir"], "projector");
    assert_eq!(p["tensor_shape"], serde_json::json!([64, 8]));
    assert_eq!(p["tensors_loaded"], serde_json::json!([64, 8]));
    assert_eq!(p["tensors_finite"], true);
    assert_eq!(p["metadata_header"], serde_json::json!(["label", "class"]));
    assert_eq!(p["metadata_rows"], 64);
    assert_eq!(p["sprite_size"], serde_json::json!([8 * 28, 8 * 28]));
    assert_eq!(p["sprite_tile"], serde_json::json!([28, 28]));
}

#[test]
fn tensorboard_drops_steps_lost_to_a_kill() {
    // Killed after a checkpoint, the process had logged steps past it; resumed from the
    // checkpoint, TensorBoard must show each step once.
    let tmp = tempfile::tempdir().unwrap();
    let data = sliced_data_dir(&tmp.path().join("data"), 1024, 100);
    let run_dir = tmp.path().join("a");
    let args = ["--limit", "1024"]; // 16 steps per epoch, 2 epochs
    let killed = kill_after_checkpoint(smoke(tmp.path(), &data, "a").args(args), &run_dir, 4);
    assert!(killed.is_some(), "finished before the kill");
    let out = run(smoke(tmp.path(), &data, "a").args(args).arg("--resume"));
    assert!(out.status.success(), "{}", stderr(&out));

    let tb = tensorboard_view(&run_dir);
    let steps = |tag: &str, kind: &str| -> Vec<u64> {
        tb[kind][tag]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e[0].as_u64().unwrap())
            .collect()
    };
    assert_eq!(
        steps("loss/total", "scalars"),
        (1..=32).collect::<Vec<u64>>()
    );
    assert_eq!(steps("epoch/loss", "scalars"), [16, 32]);
    assert_eq!(steps("reconstructions", "images"), [0, 16, 32]);
    assert_eq!(csv_column(&run_dir, "loss").len(), 32);
}

/// A finetune run: per-round scalars at the labels spent (equal to metrics.csv), the reported
/// accuracy (equal to summary.json), the bought-image grids, the class histogram, the confusion
/// matrix and the projector of the fine-tuned embeddings.
#[test]
fn tensorboard_reads_a_finetune_run() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let data = sliced_data_dir_with_labels(&root.join("data"), 600, 100);
    let out = run(&mut smoke(root, &data, "enc"));
    assert!(out.status.success(), "{}", stderr(&out));
    let out = run(&mut smoke_finetune(root, &data, &root.join("enc"), "ft"));
    assert!(out.status.success(), "{}", stderr(&out));
    let run_dir = root.join("ft");
    let tb = tensorboard_view(&run_dir);

    let steps = |tag: &str| -> Vec<(u64, f32)> {
        tb["scalars"][tag]
            .as_array()
            .unwrap_or_else(|| panic!("no scalar {tag}"))
            .iter()
            .map(|e| (e[0].as_u64().unwrap(), e[1].as_f64().unwrap() as f32))
            .collect()
    };
    let expected: Vec<u64> = vec![15, 30, 45, 60];
    for (tag, column) in [
        ("accuracy/test", "test_accuracy"),
        ("accuracy/validation", "validation_accuracy"),
        ("loss/validation", "validation_loss"),
    ] {
        let got = steps(tag);
        assert_eq!(
            got.iter().map(|s| s.0).collect::<Vec<_>>(),
            expected,
            "{tag}"
        );
        for ((_, v), (_, c)) in got.iter().zip(csv_column(&run_dir, column)) {
            assert!((v - c).abs() < 1e-4, "{tag}: {v} vs metrics.csv {c}");
        }
    }
    assert_eq!(
        steps("labels/spent"),
        expected.iter().map(|&s| (s, s as f32)).collect::<Vec<_>>()
    );
    // The reported accuracy, once, at the labels spent.
    let reported = summary(&run_dir)["test_accuracy"].as_f64().unwrap() as f32;
    assert_eq!(steps("final/test_accuracy"), [(60, reported)]);

    // One grid per purchase (its 15 images in a row, 28 px tiles, 2 px gaps), after each purchase.
    let grids = tb["images"]["labels/bought_images"].as_array().unwrap();
    assert_eq!(grids.len(), 4);
    assert_eq!(grids[0][0], 15);
    assert_eq!(grids[0][3], serde_json::json!([15 * 30 + 2, 32]));
    let cm = tb["images"]["test/confusion_matrix"].as_array().unwrap();
    assert_eq!(cm.len(), 1);
    assert_eq!(cm[0][0], 60);
    assert_eq!(cm[0][3], serde_json::json!([240, 240]));
    let h = tb["histograms"]["labels/classes"].as_array().unwrap();
    assert_eq!(h.len(), 4);
    assert_eq!(
        h[3][1], 60.0,
        "the class histogram counts every bought label"
    );

    let p = &tb["projectors"]["finetuned_embedding"];
    assert_eq!(p["tensor_shape"], serde_json::json!([50, 32]));
    assert_eq!(p["tensors_loaded"], serde_json::json!([50, 32]));
    assert_eq!(p["metadata_rows"], 50);
}

#[test]
fn tensorboard_reads_a_simclr_run() {
    let tmp = tempfile::tempdir().unwrap();
    let data = sliced_data_dir(&tmp.path().join("data"), 512, 300);
    let out = run(&mut smoke_simclr(tmp.path(), &data, "simclr"));
    assert!(out.status.success(), "{}", stderr(&out));
    let run_dir = tmp.path().join("simclr");
    let tb = tensorboard_view(&run_dir);

    let scalars = tb["scalars"].as_object().unwrap();
    let mut tags: Vec<&str> = scalars.keys().map(|s| s.as_str()).collect();
    tags.sort();
    assert_eq!(
        tags,
        [
            "epoch/alignment",
            "epoch/loss",
            "epoch/positive_top1",
            "epoch/uniformity",
            "loss/nt_xent",
            "monitor/alignment",
            "monitor/knn_test_accuracy",
            "monitor/positive_top1",
            "monitor/uniformity",
            "train/images_per_second",
            "train/learning_rate",
            "train/view_wait_share"
        ]
    );
    let wait = scalars["train/view_wait_share"].as_array().unwrap();
    assert_eq!(wait.len(), 2, "one per epoch");
    assert!(wait
        .iter()
        .all(|e| (0.0..1.0).contains(&e[1].as_f64().unwrap())));
    // Every step 1..=16 (512 images, batch 64, 2 epochs), with the values of metrics.csv.
    for (tag, column) in [
        ("loss/nt_xent", "loss"),
        ("monitor/alignment", "alignment"),
        ("monitor/uniformity", "uniformity"),
        ("monitor/positive_top1", "positive_top1"),
        ("train/learning_rate", "learning_rate"),
    ] {
        let from_tb: Vec<(u64, f32)> = scalars[tag]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| (e[0].as_u64().unwrap(), e[1].as_f64().unwrap() as f32))
            .collect();
        assert_eq!(from_tb.len(), 16, "{tag}");
        assert_eq!(from_tb, csv_column(&run_dir, column), "{tag}");
    }
    // The k-NN dashboard before training and after each epoch, an accuracy; the summary keeps
    // the last.
    let knn = scalars["monitor/knn_test_accuracy"].as_array().unwrap();
    assert_eq!(
        knn.iter()
            .map(|e| e[0].as_u64().unwrap())
            .collect::<Vec<_>>(),
        [0, 8, 16]
    );
    for e in knn {
        let v = e[1].as_f64().unwrap();
        assert!(v > 0.1 && v <= 1.0, "k-NN accuracy {v}");
    }
    let last = summary(&run_dir)["dashboard"]["monitor/knn_test_accuracy"]
        .as_f64()
        .unwrap();
    assert!((last - knn[2][1].as_f64().unwrap()).abs() < 1e-6);

    // View pairs: 8 images in one row of view A over one row of view B, at the same steps.
    let pairs = tb["images"]["views/pairs"].as_array().unwrap();
    assert_eq!(
        pairs
            .iter()
            .map(|e| e[0].as_u64().unwrap())
            .collect::<Vec<_>>(),
        [0, 8, 16]
    );
    assert_eq!(
        pairs[0][3],
        serde_json::json!([8 * 28 + 9 * 2, 2 * 28 + 3 * 2]),
        "PNG size"
    );

    // Histograms of the encoder and the projection MLP.
    let histos = tb["histograms"].as_object().unwrap();
    let conv1 = histos
        .iter()
        .find(|(k, _)| k.starts_with("weights/encoder.") && k.ends_with("conv1.weight"))
        .unwrap_or_else(|| panic!("no encoder conv1 histogram in {:?}", histos.keys()));
    assert_eq!(conv1.1[0][1].as_f64(), Some((8 * 3 * 3) as f64));
    assert_eq!(
        histos["weights/projection_out.weight"][0][1].as_f64(),
        Some((32 * 16) as f64)
    );

    // Projector: 64 test images, their 16-dimensional projections.
    let p = &tb["projectors"]["simclr_projection"];
    assert_eq!(p["tensor_shape"], serde_json::json!([64, 16]));
    assert_eq!(p["tensors_loaded"], serde_json::json!([64, 16]));
    assert_eq!(p["tensors_finite"], true);
    assert_eq!(p["metadata_rows"], 64);
    assert_eq!(p["sprite_size"], serde_json::json!([8 * 28, 8 * 28]));
}
