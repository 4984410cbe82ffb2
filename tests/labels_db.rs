//! `labels::import` from IDX files on disk into a label database.

use std::path::Path;

use frugal::data::{idx, FashionMnist, Split, IMAGE_SIDE};
use frugal::labels::{self, DatasetId, LabelDb, Purchase};

/// Writes `n_images` synthetic 28x28 training images and `n_labels` labels (label of item i is
/// i % 10) as plain IDX files, and returns the labels.
fn data_dir(dir: &Path, n_images: usize, n_labels: usize) -> Vec<u8> {
    let side = IMAGE_SIDE;
    let pixels: Vec<u8> = (0..n_images * side * side)
        .map(|i| (i * 7 % 251) as u8)
        .collect();
    std::fs::write(
        dir.join("train-images-idx3-ubyte"),
        idx::encode(&[n_images, side, side], &pixels),
    )
    .unwrap();
    let labels: Vec<u8> = (0..n_labels).map(|i| (i % 10) as u8).collect();
    std::fs::write(
        dir.join("train-labels-idx1-ubyte"),
        idx::encode(&[n_labels], &labels),
    )
    .unwrap();
    labels
}

fn buy(item: u64) -> Purchase<'static> {
    Purchase {
        item,
        round: 0,
        strategy: "random",
        score: None,
    }
}

#[test]
fn labels_import_creates_a_database_of_the_training_labels() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    std::fs::create_dir(&data).unwrap();
    let truth = data_dir(&data, 30, 30);
    let path = tmp.path().join("labels.db");

    let mut db = labels::import(&path, &data, None, Some(5)).unwrap();
    let images = FashionMnist::load_images(&data, Split::Train, None).unwrap();
    let expected = DatasetId::of_train_images(&images);
    assert_eq!(expected.name, "fashion-mnist/train");
    assert_eq!(expected.items, 30);
    assert_eq!(expected.fingerprint.len(), 8);
    assert_eq!(db.dataset().unwrap(), expected);
    db.check_dataset(&expected).unwrap();
    assert_eq!(db.budget().unwrap(), Some(5));
    assert_eq!(db.spent().unwrap(), 0);

    let got = db.query(&[buy(0), buy(13), buy(29)]).unwrap();
    assert_eq!(got, vec![truth[0], truth[13], truth[29]]);

    // A second import never replaces the ledger.
    drop(db);
    let err = labels::import(&path, &data, None, None).unwrap_err();
    assert!(format!("{err:#}").contains("already exists"), "{err:#}");
    assert_eq!(LabelDb::open(&path).unwrap().spent().unwrap(), 3);
}

#[test]
fn labels_import_with_limit_fingerprints_only_the_kept_images() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    std::fs::create_dir(&data).unwrap();
    data_dir(&data, 30, 30);
    let path = tmp.path().join("labels.db");

    let mut db = labels::import(&path, &data, Some(12), None).unwrap();
    let limited = FashionMnist::load_images(&data, Split::Train, Some(12)).unwrap();
    let full = FashionMnist::load_images(&data, Split::Train, None).unwrap();
    db.check_dataset(&DatasetId::of_train_images(&limited))
        .unwrap();
    let err = db
        .check_dataset(&DatasetId::of_train_images(&full))
        .unwrap_err();
    assert!(err.to_string().contains("labels.db"), "{err}");
    assert!(db.query(&[buy(11)]).is_ok());
    assert!(db.query(&[buy(12)]).is_err());
}

#[test]
fn labels_import_refuses_label_file_of_other_length() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    std::fs::create_dir(&data).unwrap();
    data_dir(&data, 30, 29);
    let path = tmp.path().join("labels.db");

    let err = labels::import(&path, &data, None, None).unwrap_err();
    let msg = format!("{err:#}");
    assert!(msg.contains("do not belong together"), "{msg}");
    assert!(!path.exists());
    // Nothing at all left behind next to where the database would have been.
    assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 1);
}

#[test]
fn labels_import_without_label_file_fails_cleanly() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    std::fs::create_dir(&data).unwrap();
    data_dir(&data, 5, 5);
    std::fs::remove_file(data.join("train-labels-idx1-ubyte")).unwrap();
    let path = tmp.path().join("labels.db");

    let err = labels::import(&path, &data, None, None).unwrap_err();
    assert!(
        format!("{err:#}").contains("train-labels-idx1-ubyte"),
        "{err:#}"
    );
    assert!(!path.exists());
}

#[test]
fn a_copy_holds_the_same_truth_budget_and_ledger_and_never_overwrites() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    std::fs::create_dir(&data).unwrap();
    data_dir(&data, 30, 30);
    let path = tmp.path().join("labels.db");
    let mut db = labels::import(&path, &data, None, Some(5)).unwrap();
    db.query(&[buy(2), buy(7)]).unwrap();

    let copy = tmp.path().join("copy.db");
    db.copy_to(&copy).unwrap();
    let mut c = LabelDb::open(&copy).unwrap();
    assert_eq!(c.dataset().unwrap(), db.dataset().unwrap());
    assert_eq!(c.budget().unwrap(), Some(5));
    let items = |d: &LabelDb| -> Vec<u64> { d.bought().unwrap().iter().map(|b| b.item).collect() };
    assert_eq!(items(&c), vec![2, 7]);
    // The copy enforces the same budget: 2 spent of 5, so 4 more are refused.
    assert!(c.query(&[buy(1), buy(3), buy(4), buy(5)]).is_err());
    assert_eq!(c.spent().unwrap(), 2);
    // No partial file is left beside it.
    let names: Vec<String> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("partial"))
        .collect();
    assert!(names.is_empty(), "{names:?}");

    // Never over an existing file: the copy and its ledger stay as they were.
    let err = db.copy_to(&copy).unwrap_err();
    assert!(err.to_string().contains("already exists"), "{err}");
    assert_eq!(items(&LabelDb::open(&copy).unwrap()), vec![2, 7]);
    assert_eq!(db.spent().unwrap(), 2);
}
