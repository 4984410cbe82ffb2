//! Kill -9 in the middle of training, `--resume`, and end with exactly what an uninterrupted run
//! gives: same weights, same losses at every step, TensorBoard without duplicated steps.

mod common;

use common::*;

#[test]
fn killed_and_resumed_matches_uninterrupted() {
    let tmp = tempfile::tempdir().unwrap();
    let data = sliced_data_dir(&tmp.path().join("data"), 1024, 64);
    // 1024 images / 64 = 16 steps per epoch, 3 epochs, a checkpoint every 3 steps.
    let args = ["--epochs", "3", "--limit", "1024"];

    let out = run(smoke(tmp.path(), &data, "straight").args(args));
    assert!(out.status.success(), "{}", stderr(&out));

    let resumed = tmp.path().join("resumed");
    let first = kill_after_checkpoint(smoke(tmp.path(), &data, "resumed").args(args), &resumed, 4);
    let first = first.expect("the first run finished before it could be killed");
    assert!(first < 48, "killed mid-run");
    // Kill the resumed run again, later on, then let it finish.
    let second = kill_after_checkpoint(
        smoke(tmp.path(), &data, "resumed")
            .args(args)
            .arg("--resume"),
        &resumed,
        first + 10,
    )
    .expect("the resumed run finished before it could be killed again");
    assert!(
        first < second && second < 48,
        "killed again, later, mid-run"
    );
    // What a kill in the middle of an atomic write leaves: a temporary file, cleared on resume.
    let stale = resumed.join(".checkpoint.bin.tmp.4242");
    std::fs::write(&stale, b"half a checkpoint").unwrap();
    let out = run(smoke(tmp.path(), &data, "resumed")
        .args(args)
        .arg("--resume"));
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(!stale.exists(), "stale temporary file removed");
    let err = stderr(&out);
    assert!(err.contains("resuming"), "{err}");
    eprintln!("killed at checkpoint steps {first} and {second}");

    let (a, b) = (summary(&tmp.path().join("straight")), summary(&resumed));
    assert_eq!(a["global_step"], 48);
    for key in [
        "global_step",
        "weights_sum",
        "weights_sum_squares",
        "last_epoch_losses",
    ] {
        assert_eq!(a[key], b[key], "{key}");
    }
    assert_eq!(
        metric_rows(&tmp.path().join("straight")),
        metric_rows(&resumed)
    );

    // A finished run resumed again has nothing left to do and changes nothing.
    let before = std::fs::read(resumed.join("checkpoint.bin")).unwrap();
    let out = run(smoke(tmp.path(), &data, "resumed")
        .args(args)
        .arg("--resume"));
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        std::fs::read(resumed.join("checkpoint.bin")).unwrap(),
        before
    );

    // And it can be extended: --epochs raises the total.
    let out =
        run(smoke(tmp.path(), &data, "resumed")
            .args(["--epochs", "4", "--limit", "1024", "--resume"]));
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(summary(&resumed)["global_step"], 64);
}
