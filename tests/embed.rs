//! `frugal embed` end to end: a smoke encoder pretrained on a real Fashion-MNIST slice, its
//! features written as NumPy arrays.

mod common;

use std::path::Path;

use common::*;

/// Shape and values of a float32 `.npy` file written by `frugal embed`.
fn read_npy(path: &Path) -> ((usize, usize), Vec<f32>) {
    let bytes = std::fs::read(path).unwrap();
    assert_eq!(&bytes[..8], b"\x93NUMPY\x01\x00", "{}", path.display());
    let len = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
    let header = std::str::from_utf8(&bytes[10..10 + len]).unwrap();
    assert!(header.contains("'descr': '<f4'"), "{header}");
    let shape = header.split("'shape': (").nth(1).unwrap();
    let dims: Vec<usize> = shape
        .split(')')
        .next()
        .unwrap()
        .split(',')
        .filter(|s| !s.trim().is_empty())
        .map(|s| s.trim().parse().unwrap())
        .collect();
    let values: Vec<f32> = bytes[10 + len..]
        .chunks(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    assert_eq!(values.len(), dims[0] * dims[1]);
    ((dims[0], dims[1]), values)
}

fn embed(encoder: &Path, data: &Path, out: &Path, batch: &str) -> std::process::Output {
    run(frugal()
        .args([
            "embed",
            "--threads",
            "2",
            "--limit",
            "50",
            "--test-limit",
            "20",
        ])
        .arg("--encoder")
        .arg(encoder)
        .arg("--data-dir")
        .arg(data)
        .arg("--out")
        .arg(out)
        .args(["--batch-size", batch]))
}

#[test]
fn embed_writes_one_feature_row_per_image_whatever_the_batch() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    // No training labels in this data dir: embedding must not need them.
    let data = sliced_data_dir(&root.join("data"), 200, 100);
    let out = run(&mut smoke(root, &data, "enc"));
    assert!(out.status.success(), "pretraining failed: {}", stderr(&out));
    let enc = root.join("enc");

    let a = embed(&enc, &data, &root.join("a"), "1024");
    assert!(a.status.success(), "embed failed: {}", stderr(&a));
    let ((n, dim), train) = read_npy(&root.join("a/train.npy"));
    let ((m, dim_test), _) = read_npy(&root.join("a/test.npy"));
    assert_eq!((n, m), (50, 20));
    assert_eq!(dim, dim_test);
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root.join("a/embed.json")).unwrap()).unwrap();
    assert_eq!(meta["feature_dim"], dim);
    assert_eq!(meta["train_rows"], 50);
    assert_eq!(meta["encoder"]["method"], "vae");
    assert!(train.iter().all(|v| v.is_finite()));
    // Different images, different features (a constant output would pass every shape check).
    assert_ne!(train[..dim], train[dim..2 * dim]);

    // Row i is image i, however the images are batched.
    let b = embed(&enc, &data, &root.join("b"), "7");
    assert!(b.status.success(), "embed failed: {}", stderr(&b));
    let (_, train_b) = read_npy(&root.join("b/train.npy"));
    let worst = train
        .iter()
        .zip(&train_b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0f32, f32::max);
    assert!(worst < 1e-4, "batch size changed a feature by {worst}");

    // A second export into the same directory replaces the arrays and their description.
    let again = embed(&enc, &data, &root.join("a"), "7");
    assert!(again.status.success(), "embed failed: {}", stderr(&again));
    assert!(root.join("a/embed.json").exists());
    assert!(!root.join("a/train.npy.tmp").exists());
    assert_eq!(read_npy(&root.join("a/train.npy")).0, (50, dim));
}

#[test]
fn embed_refuses_a_directory_that_is_no_encoder_run() {
    let tmp = tempfile::tempdir().unwrap();
    let out = embed(
        tmp.path(),
        Path::new("/nonexistent"),
        &tmp.path().join("o"),
        "8",
    );
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("is not a pretraining run"), "{err}");
    assert!(!tmp.path().join("o/train.npy").exists());
}
