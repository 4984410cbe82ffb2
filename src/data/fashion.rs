//! Fashion-MNIST on disk (Debian's `dataset-fashion-mnist`) and in memory.

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};

use super::idx::{self, IdxImages};

/// Where Debian's package `dataset-fashion-mnist` puts the files.
pub const DEFAULT_DATA_DIR: &str = "/usr/share/datasets/fashion-mnist";
/// Images are `IMAGE_SIDE x IMAGE_SIDE` grayscale.
pub const IMAGE_SIDE: usize = 28;
/// Class names, indexed by label.
pub const CLASS_NAMES: [&str; 10] = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
];

/// The two splits of the dataset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    /// 60,000 images; their labels are only for the label database's import.
    Train,
    /// 10,000 images; their labels are for the final report only.
    Test,
}

impl Split {
    fn prefix(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Test => "t10k",
        }
    }
}

/// Images of one split, as u8 pixels in memory (47 MB for the training split).
#[derive(Debug, Clone)]
pub struct FashionMnist {
    images: IdxImages,
    /// Images in the file before `limit` was applied (to check the label file against).
    in_file: usize,
}

impl FashionMnist {
    /// Path of a split's image file (`<prefix>-images-idx3-ubyte`, gzipped or not).
    pub fn images_path(dir: &Path, split: Split) -> Result<PathBuf> {
        find(dir, &format!("{}-images-idx3-ubyte", split.prefix()))
    }

    /// Path of a split's label file. Only the label database's import and the final test report
    /// open these.
    pub fn labels_path(dir: &Path, split: Split) -> Result<PathBuf> {
        find(dir, &format!("{}-labels-idx1-ubyte", split.prefix()))
    }

    /// Loads the images of `split` (never its labels), keeping the first `limit` if given.
    pub fn load_images(dir: &Path, split: Split, limit: Option<usize>) -> Result<Self> {
        let path = Self::images_path(dir, split)?;
        let mut images = idx::read_images(&path, IMAGE_SIDE, IMAGE_SIDE)?;
        let in_file = images.len();
        if images.is_empty() {
            bail!("{}: holds no images", path.display());
        }
        if let Some(limit) = limit {
            if limit == 0 {
                bail!("--limit must be at least 1");
            }
            images
                .pixels
                .truncate(limit.min(images.len()) * IMAGE_SIDE * IMAGE_SIDE);
        }
        Ok(Self { images, in_file })
    }

    /// Loads the labels of `split`, checking that there is one per image of `images`.
    pub fn load_labels(dir: &Path, split: Split, images: &FashionMnist) -> Result<Vec<u8>> {
        let path = Self::labels_path(dir, split)?;
        let mut labels = idx::read_labels(&path, CLASS_NAMES.len())?;
        if labels.len() != images.in_file {
            bail!(
                "{} has {} labels but {} has {} images: the files do not belong together",
                path.display(),
                labels.len(),
                Self::images_path(dir, split)?.display(),
                images.in_file
            );
        }
        labels.truncate(images.len());
        Ok(labels)
    }

    /// Images from raw pixels, `n * 784` bytes (image after image, each row-major): synthetic data
    /// for tests and benchmarks, with no files involved.
    pub fn from_pixels(pixels: Vec<u8>) -> Result<Self> {
        let px = IMAGE_SIDE * IMAGE_SIDE;
        if pixels.is_empty() || !pixels.len().is_multiple_of(px) {
            bail!(
                "{} bytes are not a whole number (at least 1) of {px}-byte images",
                pixels.len()
            );
        }
        let in_file = pixels.len() / px;
        Ok(Self {
            images: IdxImages {
                rows: IMAGE_SIDE,
                cols: IMAGE_SIDE,
                pixels,
            },
            in_file,
        })
    }

    /// Number of images.
    pub fn len(&self) -> usize {
        self.images.len()
    }

    pub fn is_empty(&self) -> bool {
        self.images.is_empty()
    }

    /// Pixels of image `i`, `IMAGE_SIDE * IMAGE_SIDE` bytes, row-major.
    pub fn image(&self, i: usize) -> &[u8] {
        let n = IMAGE_SIDE * IMAGE_SIDE;
        &self.images.pixels[i * n..(i + 1) * n]
    }

    /// Image `i` as f32 in [0, 1].
    pub fn image_f32(&self, i: usize) -> Vec<f32> {
        self.image(i).iter().map(|&p| pixel_value(p)).collect()
    }
}

/// A pixel byte as the model sees it: a value in [0, 1]. (Multiplying by the reciprocal is what
/// the measured runs in the README used; keep it, or their numbers move in the last digits.)
pub fn pixel_value(p: u8) -> f32 {
    p as f32 * (1.0 / 255.0)
}

/// Finds `stem` or `stem.gz` in `dir`, with an error that says what to do.
fn find(dir: &Path, stem: &str) -> Result<PathBuf> {
    if !dir.is_dir() {
        bail!(
            "data directory {} does not exist (install Debian's package dataset-fashion-mnist, \
             e.g. with scripts/setup.sh, or pass --data-dir)",
            dir.display()
        );
    }
    for name in [format!("{stem}.gz"), stem.to_string()] {
        let p = dir.join(&name);
        if p.is_file() {
            return Ok(p);
        }
    }
    bail!(
        "{}: no {stem}.gz or {stem} in this directory",
        dir.display()
    )
}
