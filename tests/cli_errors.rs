//! Bad input: each case ends with a clear one-line error naming the culprit, a non-zero exit
//! code, no panic, and nothing of the user's overwritten.

mod common;

use std::path::Path;

use common::*;

/// Runs and checks the failure shape: exit 1, one line on stderr starting `error:`, no panic,
/// containing every one of `wants`.
fn fails_with(cmd: &mut std::process::Command, wants: &[&str]) {
    let out = run(cmd);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "exit code; stderr: {err}");
    assert!(!err.contains("panicked"), "panic: {err}");
    let error_lines: Vec<&str> = err.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(error_lines.len(), 1, "one error line expected: {err}");
    let line = error_lines[0];
    assert!(
        err.trim_end().ends_with(line),
        "the error is the last line: {err}"
    );
    for w in wants {
        assert!(line.contains(w), "{w:?} not in {line:?}");
    }
}

fn data(tmp: &Path) -> std::path::PathBuf {
    sliced_data_dir(&tmp.join("data"), 256, 64)
}

#[test]
fn missing_data_dir() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("nope");
    fails_with(
        &mut smoke(tmp.path(), &missing, "r"),
        &["nope", "does not exist", "dataset-fashion-mnist"],
    );
}

#[test]
fn truncated_gz() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = data(tmp.path());
    let f = dir.join("train-images-idx3-ubyte.gz");
    let bytes = std::fs::read(&f).unwrap();
    std::fs::write(&f, &bytes[..bytes.len() / 2]).unwrap();
    fails_with(
        &mut smoke(tmp.path(), &dir, "r"),
        &["train-images-idx3-ubyte.gz", "truncated"],
    );
}

#[test]
fn wrong_magic() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = data(tmp.path());
    // A label file where the images should be: a valid IDX file of the wrong kind.
    std::fs::copy(
        dir.join("t10k-labels-idx1-ubyte.gz"),
        dir.join("train-images-idx3-ubyte.gz"),
    )
    .unwrap();
    fails_with(
        &mut smoke(tmp.path(), &dir, "r"),
        &[
            "train-images-idx3-ubyte.gz",
            "wrong magic number 0x00000801",
        ],
    );
}

#[test]
fn count_mismatch() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = data(tmp.path());
    let other = sliced_data_dir(&tmp.path().join("other"), 256, 50);
    std::fs::copy(
        other.join("t10k-labels-idx1-ubyte.gz"),
        dir.join("t10k-labels-idx1-ubyte.gz"),
    )
    .unwrap();
    fails_with(
        &mut smoke(tmp.path(), &dir, "r"),
        &["t10k-labels-idx1-ubyte.gz has 50 labels", "64 images"],
    );
}

#[test]
fn checkpoint_problems_never_overwrite_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = data(tmp.path());
    let out = run(smoke(tmp.path(), &dir, "r").args(["--epochs", "1"]));
    assert!(out.status.success(), "{}", stderr(&out));
    let ck = tmp.path().join("r/checkpoint.bin");
    let good = std::fs::read(&ck).unwrap();

    // Empty.
    std::fs::write(&ck, b"").unwrap();
    fails_with(
        smoke(tmp.path(), &dir, "r").arg("--resume"),
        &["checkpoint.bin", "empty"],
    );
    assert_eq!(std::fs::read(&ck).unwrap().len(), 0, "left as is");

    // Corrupt: one flipped byte in the middle, then a truncated copy.
    let mut flipped = good.clone();
    flipped[good.len() / 2] ^= 0x10;
    std::fs::write(&ck, &flipped).unwrap();
    fails_with(
        smoke(tmp.path(), &dir, "r").arg("--resume"),
        &["checkpoint.bin", "corrupt"],
    );
    assert_eq!(std::fs::read(&ck).unwrap(), flipped, "left as is");
    std::fs::write(&ck, &good[..good.len() - 100]).unwrap();
    fails_with(
        smoke(tmp.path(), &dir, "r").arg("--resume"),
        &["checkpoint.bin", "corrupt"],
    );

    // Not a checkpoint at all.
    std::fs::write(&ck, b"hello, I am a text file\n").unwrap();
    fails_with(
        smoke(tmp.path(), &dir, "r").arg("--resume"),
        &["not a frugal checkpoint"],
    );

    // Another architecture: the same run resumed with a pipeline asking for a wider latent.
    std::fs::write(&ck, &good).unwrap();
    let wide = tmp.path().join("wide.toml");
    let text = std::fs::read_to_string(smoke_pipeline()).unwrap();
    std::fs::write(&wide, text.replace("latent_dim = 8", "latent_dim = 12")).unwrap();
    fails_with(
        frugal()
            .args(["ssl-pretrain", "--resume", "--run", "r", "--pipeline"])
            .arg(&wide)
            .arg("--checkpoints")
            .arg(tmp.path())
            .arg("--data-dir")
            .arg(&dir),
        &["checkpoint.bin", "\"latent_dim\":8", "\"latent_dim\":12"],
    );
    assert_eq!(std::fs::read(&ck).unwrap(), good, "left as is");

    // A resume that would change the data order: another seed, batch size or data limit.
    for flags in [["--seed", "8"], ["--batch-size", "32"], ["--limit", "128"]] {
        fails_with(
            smoke(tmp.path(), &dir, "r").arg("--resume").args(flags),
            &["cannot resume", "data order would change"],
        );
    }
    assert_eq!(std::fs::read(&ck).unwrap(), good, "left as is");

    // A fresh start on top of an existing run is refused, not overwritten.
    fails_with(
        &mut smoke(tmp.path(), &dir, "r"),
        &["already holds a run", "--resume"],
    );
    assert_eq!(std::fs::read(&ck).unwrap(), good, "left as is");

    // Missing checkpoint.
    std::fs::remove_file(&ck).unwrap();
    fails_with(
        smoke(tmp.path(), &dir, "r").arg("--resume"),
        &["no checkpoint at", "checkpoint.bin"],
    );
    // Missing run.
    fails_with(
        smoke(tmp.path(), &dir, "other").arg("--resume"),
        &["does not exist", "nothing to resume"],
    );
}

#[test]
fn unwritable_run_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = data(tmp.path());
    // A file where the checkpoints root should be: no run directory can be made in it (this holds
    // for root too, unlike permission bits).
    let blocker = tmp.path().join("blocker");
    std::fs::write(&blocker, b"").unwrap();
    fails_with(
        &mut smoke(&blocker, &dir, "r"),
        &["cannot create run directory", "blocker"],
    );
}

#[test]
fn bad_flags_and_pipelines() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = data(tmp.path());
    fails_with(
        smoke(tmp.path(), &dir, "r").args(["--epochs", "0"]),
        &["epochs must be at least 1"],
    );
    fails_with(
        smoke(tmp.path(), &dir, "r").args(["--limit", "0"]),
        &["limit must be at least 1"],
    );
    fails_with(
        &mut smoke(tmp.path(), &dir, "../escape"),
        &["--run must be a plain name"],
    );
    let bad = tmp.path().join("bad.toml");
    std::fs::write(&bad, "[train]\nepochz = 2\n").unwrap();
    fails_with(
        frugal()
            .args(["ssl-pretrain", "--pipeline"])
            .arg(&bad)
            .arg("--checkpoints")
            .arg(tmp.path()),
        &["bad.toml", "epochz"],
    );
    fails_with(
        frugal()
            .args(["ssl-pretrain", "--pipeline"])
            .arg(tmp.path().join("missing.toml")),
        &["cannot read config file", "missing.toml"],
    );
    // SimCLR settings that would fail deep inside training are refused up front, by key.
    let simclr = std::fs::read_to_string(repo().join("pipelines/smoke-simclr.toml")).unwrap();
    for (from, to, wants) in [
        (
            "temperature = 0.5",
            "temperature = 0.0",
            "simclr.temperature",
        ),
        (
            "crop_scale = [0.3, 1.0]",
            "crop_scale = [0.5, 0.2]",
            "simclr.augment.crop_scale",
        ),
        (
            "kind = \"conv\"\nchannels = [8, 16, 16]",
            "kind = \"resnet\"\nblocks = [1, 0, 1]",
            "simclr.encoder",
        ),
        (
            "batch_size = 64",
            "batch_size = 1",
            "batch_size must be at least 2",
        ),
    ] {
        assert!(simclr.contains(from), "smoke-simclr.toml has no {from:?}");
        let path = tmp.path().join("simclr-bad.toml");
        std::fs::write(&path, simclr.replace(from, to)).unwrap();
        fails_with(&mut smoke_with(&path, tmp.path(), &dir, "s"), &[wants]);
    }
}

/// `--device`: `cuda`/`cuda:N` on a binary without CUDA support is one clear error and writes
/// nothing; a malformed value is a usage error naming the accepted forms, on the command line and
/// in a pipeline file; `auto` runs, on the CPU when this binary has no CUDA support, and says so.
#[test]
fn device_choice() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let dir = data(root);
    #[cfg(not(feature = "cuda"))]
    for device in ["cuda", "cuda:1"] {
        fails_with(
            smoke(root, &dir, "c").args(["--device", device]),
            &["without CUDA support", "--features cuda"],
        );
        assert!(
            !root.join("c").exists(),
            "nothing written for an unusable device"
        );
        fails_with(
            smoke_finetune(root, &dir, &root.join("no-encoder"), "f").args(["--device", device]),
            &["without CUDA support", "--features cuda"],
        );
        assert!(!root.join("f").exists(), "no finetune run either");
    }
    for bad in ["cuda:x", "gpu", "cuda:", "CPU"] {
        let out = run(smoke(root, &dir, "b").args(["--device", bad]));
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "a usage error: {err}");
        assert!(!err.contains("panicked"), "{err}");
        assert!(
            err.contains(&format!("invalid value '{bad}' for '--device")),
            "{bad}: {err}"
        );
        assert!(err.contains("cuda:N") || err.contains("cuda:0"), "{err}");
    }
    let pipeline = std::fs::read_to_string(smoke_pipeline()).unwrap();
    assert!(pipeline.contains("device = \"cpu\""));
    let bad = root.join("bad-device.toml");
    std::fs::write(
        &bad,
        pipeline.replace("device = \"cpu\"", "device = \"cuda:x\""),
    )
    .unwrap();
    fails_with(
        &mut smoke_with(&bad, root, &dir, "p"),
        &["bad-device.toml", "cuda:x", "cuda:N"],
    );

    // A tiny job (256 images, one epoch: well under a second of training).
    let out = run(smoke(root, &dir, "auto").args(["--device", "auto", "--epochs", "1"]));
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    let chosen = if cfg!(feature = "cuda") && err.contains("--device auto: using cuda:0") {
        "cuda:0"
    } else {
        assert!(err.contains("--device auto: using the CPU ("), "{err}");
        #[cfg(not(feature = "cuda"))]
        assert!(err.contains("without CUDA support"), "{err}");
        "cpu"
    };
    assert_eq!(summary(&root.join("auto"))["device"], chosen);
    let saved = std::fs::read_to_string(root.join("auto/config.toml")).unwrap();
    assert!(
        saved.contains(&format!("device = \"{chosen}\"")),
        "the effective config records the device that ran: {saved}"
    );
}

/// `frugal finetune` refuses impossible budgets, missing or foreign encoders and label databases
/// that are not ours or belong to another pool, before buying anything.
#[test]
fn finetune_bad_input() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let data = sliced_data_dir_with_labels(&root.join("data"), 600, 100);
    let out = run(&mut smoke(root, &data, "enc"));
    assert!(out.status.success(), "{}", stderr(&out));
    let enc = root.join("enc");
    let ft = |run_name: &str| smoke_finetune(root, &data, &enc, run_name);

    fails_with(
        ft("a").args(["--labels", "10", "--initial", "15"]),
        &["budget (10)", "smaller than the first batch"],
    );
    fails_with(
        ft("b").args(["--labels", "700"]),
        &["budget (700)", "larger than the pool (600"],
    );
    // The stage's flags without the stage would silently do nothing: refused, nothing bought.
    fails_with(
        ft("flip").args(["--test-time-flip"]),
        &["--test-time-flip", "the stage is off", "--semi fixmatch"],
    );
    assert!(!root.join("flip").join("labels.db").exists());
    for flag in ["--semi-refit", "--pseudo-label-flip"] {
        fails_with(
            ft("stage-flag").arg(flag),
            &[flag, "the stage is off", "--semi fixmatch"],
        );
    }
    fails_with(
        ft("stage-flag").args(["--semi-epochs", "3"]),
        &["--semi-epochs", "the stage is off"],
    );
    fails_with(
        ft("stage-flag").args(["--semi-members", "2"]),
        &["--semi-members", "the stage is off"],
    );
    assert!(!root.join("stage-flag").join("labels.db").exists());
    fails_with(
        &mut smoke_finetune(root, &data, &root.join("nope"), "c"),
        &["nope", "does not exist", "ssl-pretrain"],
    );

    // A finished finetune run is not an encoder. (Turning a stage setting off says nothing about
    // the stage, so it is not refused.)
    let out = run(ft("done").args(["--test-time-flip", "false", "--semi-refit", "false"]));
    assert!(out.status.success(), "{}", stderr(&out));
    fails_with(
        &mut smoke_finetune(root, &data, &root.join("done"), "d"),
        &["finetune checkpoint", "not a pretrained encoder"],
    );

    // Not SQLite at all; SQLite but not ours.
    let junk = root.join("junk.db");
    std::fs::write(&junk, vec![7u8; 4096]).unwrap();
    fails_with(ft("e").arg("--label-db").arg(&junk), &["junk.db", "not a"]);
    // Labels of another pool: imported for the first 100 images, used with a pool of 600.
    let other = root.join("other.db");
    let out = run(frugal()
        .args(["labels", "import", "--label-db"])
        .arg(&other)
        .arg("--data-dir")
        .arg(&data)
        .args(["--limit", "100"]));
    assert!(out.status.success(), "{}", stderr(&out));
    fails_with(
        ft("f").arg("--label-db").arg(&other),
        &["other.db", "holds labels of", "(100 items", "(600 items"],
    );
    assert_eq!(
        frugal::labels::LabelDb::open(&other)
            .unwrap()
            .spent()
            .unwrap(),
        0
    );

    // The encoder run replaced by one of another architecture, under a run that resumes (a
    // finished one: even with nothing left to do, it refuses the changed encoder).
    let out = run(&mut ft("g"));
    assert!(out.status.success(), "{}", stderr(&out));
    std::fs::remove_dir_all(&enc).unwrap();
    let wider = root.join("wider.toml");
    std::fs::write(
        &wider,
        std::fs::read_to_string(smoke_pipeline())
            .unwrap()
            .replace("channels = [8, 16, 16]", "channels = [8, 16, 24]"),
    )
    .unwrap();
    let cmd = smoke(root, &data, "enc");
    let args: Vec<_> = cmd.get_args().map(|a| a.to_owned()).collect();
    let mut cmd = frugal();
    for a in &args {
        cmd.arg(if a == smoke_pipeline().as_os_str() {
            wider.as_os_str()
        } else {
            a
        });
    }
    let out = run(&mut cmd);
    assert!(out.status.success(), "{}", stderr(&out));
    fails_with(
        ft("g").arg("--resume"),
        &["checkpoint.bin", "holds", "[8,16,16]", "[8,16,24]"],
    );
}
