//! `frugal ssl-pretrain --method simclr`: a run killed with SIGKILL resumes to exactly what an
//! uninterrupted run gives, and `frugal finetune` takes its encoder (conv or ResNet) unchanged.

mod common;

use common::*;
use std::path::Path;

#[test]
fn simclr_killed_and_resumed_matches_uninterrupted() {
    let tmp = tempfile::tempdir().unwrap();
    let data = sliced_data_dir(&tmp.path().join("data"), 512, 300);
    // 512 images / 64 = 8 steps per epoch, 3 epochs, a checkpoint every 3 steps.
    let args = ["--epochs", "3"];

    let out = run(smoke_simclr(tmp.path(), &data, "straight").args(args));
    assert!(out.status.success(), "{}", stderr(&out));
    let straight = summary(&tmp.path().join("straight"));
    assert_eq!(straight["method"], "simclr");
    assert_eq!(straight["global_step"], 24);
    let losses = &straight["last_epoch_losses"];
    for key in ["loss", "alignment", "uniformity", "positive_top1"] {
        assert!(losses[key].as_f64().unwrap().is_finite(), "{key}: {losses}");
    }
    let knn = straight["dashboard"]["monitor/knn_test_accuracy"]
        .as_f64()
        .unwrap();
    assert!((0.0..=1.0).contains(&knn), "{knn}");

    let resumed = tmp.path().join("resumed");
    let first = kill_after_checkpoint(
        smoke_simclr(tmp.path(), &data, "resumed").args(args),
        &resumed,
        4,
    )
    .expect("the first run finished before it could be killed");
    assert!(first < 24, "killed mid-run");
    let out = run(smoke_simclr(tmp.path(), &data, "resumed")
        .args(args)
        .arg("--resume"));
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("resuming"), "{}", stderr(&out));
    eprintln!("killed at checkpoint step {first}");

    let b = summary(&resumed);
    for key in [
        "global_step",
        "weights_sum",
        "weights_sum_squares",
        "last_epoch_losses",
    ] {
        assert_eq!(straight[key], b[key], "{key}");
    }
    // The dashboard's k-NN is a function of the weights; its view-wait share is a timing.
    let knn = |s: &serde_json::Value| s["dashboard"]["monitor/knn_test_accuracy"].clone();
    assert_eq!(knn(&straight), knn(&b));
    assert_eq!(
        metric_rows(&tmp.path().join("straight")),
        metric_rows(&resumed)
    );
}

/// The smoke SimCLR pipeline with a small ResNet encoder.
fn resnet_pipeline(dir: &Path) -> std::path::PathBuf {
    let text = std::fs::read_to_string(repo().join("pipelines/smoke-simclr.toml")).unwrap();
    let text = text.replace(
        "kind = \"conv\"\nchannels = [8, 16, 16]",
        "kind = \"resnet\"\nwidths = [8, 16, 16]\nblocks = [1, 1, 1]",
    );
    assert!(
        text.contains("resnet"),
        "smoke-simclr.toml changed its encoder section"
    );
    let path = dir.join("smoke-resnet.toml");
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn finetune_takes_simclr_encoders() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let data = sliced_data_dir_with_labels(&root.join("data"), 600, 300);
    let out = run(&mut smoke_simclr(root, &data, "conv"));
    assert!(out.status.success(), "{}", stderr(&out));
    let out = run(&mut smoke_with(
        &resnet_pipeline(root),
        root,
        &data,
        "resnet",
    ));
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(summary(&root.join("resnet"))["method"], "simclr");

    // A linear head on the frozen conv encoder; the ResNet with its last stage trainable.
    for (encoder, flags) in [
        ("conv", vec!["--hidden", "0"]),
        ("resnet", vec!["--freeze", "partial"]),
    ] {
        let name = format!("ft-{encoder}");
        let out = run(smoke_finetune(root, &data, &root.join(encoder), &name).args(&flags));
        assert!(out.status.success(), "{encoder}: {}", stderr(&out));
        let s = summary(&root.join(&name));
        assert_eq!(s["labels_bought"], 60, "{encoder}");
        let acc = s["test_accuracy"].as_f64().unwrap();
        // 60 labels, 10 classes: chance is 10%.
        assert!(acc > 0.25, "{encoder}: test accuracy {acc}");
    }

    // A VAE run's checkpoint is not a SimCLR model: resuming it as one is refused.
    let out =
        run(smoke_simclr(root, &data, "conv")
            .args(["--method", "vae", "--resume", "--epochs", "3"]));
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(!err.contains("panicked"), "{err}");
    assert!(err.contains("holds a simclr pretrain model"), "{err}");
}
