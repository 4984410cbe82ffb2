//! `frugal embed`: the features of a pretrained encoder for every training and test image,
//! written as NumPy arrays for analysis outside frugal (linear probes, label propagation, UMAP).
//! No label file is read.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use burn::tensor::backend::AutodiffBackend;
use serde::Serialize;

use crate::data::{FashionMnist, Split};
use crate::device::BackendJob;
use crate::finetune::encoder::{encode_all, load_encoder};

/// What to embed and where to write it.
#[derive(Debug, Clone)]
pub struct EmbedRun {
    /// A `frugal ssl-pretrain` run directory.
    pub encoder: PathBuf,
    pub data_dir: PathBuf,
    /// Output directory: `train.npy`, `test.npy`, `embed.json`.
    pub out: PathBuf,
    /// Only the first images of each split.
    pub limit: Option<usize>,
    pub test_limit: Option<usize>,
    /// Images per forward pass.
    pub batch_size: usize,
}

/// `embed.json`: what the arrays hold.
#[derive(Debug, Clone, Serialize)]
pub struct EmbedSummary {
    pub encoder_run: String,
    /// Pretraining method, encoder config and progress of the encoder run.
    pub encoder: serde_json::Value,
    pub feature_dim: usize,
    pub train_rows: usize,
    pub test_rows: usize,
    /// Row `i` of `train.npy` is image `i` of the training image file (the label database's item
    /// `i`); row `i` of `test.npy` is test image `i`.
    pub rows: String,
    pub seconds: f64,
}

/// Embeds both splits on the backend the CLI chose.
pub struct EmbedJob(pub EmbedRun);

impl BackendJob for EmbedJob {
    type Output = EmbedSummary;

    fn run<B: AutodiffBackend>(self, device: B::Device) -> Result<EmbedSummary> {
        let started = std::time::Instant::now();
        let r = self.0;
        if r.batch_size == 0 {
            bail!("--batch-size must be at least 1");
        }
        let pretrained = load_encoder::<B::InnerBackend>(&r.encoder, &device)?;
        let train = FashionMnist::load_images(&r.data_dir, Split::Train, r.limit)?;
        let test = FashionMnist::load_images(&r.data_dir, Split::Test, r.test_limit)?;
        let dim = pretrained.feature_dim;
        std::fs::create_dir_all(&r.out)
            .with_context(|| format!("cannot create the output directory {}", r.out.display()))?;
        // embed.json is written last: a kill while the arrays are replaced must not leave an
        // earlier run's description next to them.
        let meta = r.out.join("embed.json");
        if meta.exists() {
            std::fs::remove_file(&meta)
                .with_context(|| format!("cannot replace {}", meta.display()))?;
        }
        for (images, name) in [(&train, "train"), (&test, "test")] {
            let rows = encode_all(
                &pretrained.encoder,
                images,
                r.batch_size,
                &format!("features ({name})"),
                &device,
            )?;
            write_npy(&r.out.join(format!("{name}.npy")), images.len(), dim, &rows)?;
        }
        let summary = EmbedSummary {
            encoder_run: r.encoder.display().to_string(),
            encoder: pretrained.identity,
            feature_dim: dim,
            train_rows: train.len(),
            test_rows: test.len(),
            rows: "raw encoder features (not standardized), float32, one row per image in file \
                   order"
                .into(),
            seconds: started.elapsed().as_secs_f64(),
        };
        crate::checkpoint::write_atomic(&meta, serde_json::to_string_pretty(&summary)?.as_bytes())?;
        Ok(summary)
    }
}

/// Writes `values` (`[rows, cols]`, row-major) as a NumPy `.npy` file (format 1.0, little-endian
/// float32), through a temporary file renamed into place.
pub fn write_npy(path: &Path, rows: usize, cols: usize, values: &[f32]) -> Result<()> {
    if values.len() != rows * cols {
        bail!(
            "{}: {} values do not make a [{rows}, {cols}] array",
            path.display(),
            values.len()
        );
    }
    let mut header =
        format!("{{'descr': '<f4', 'fortran_order': False, 'shape': ({rows}, {cols}), }}");
    // Magic (6) + version (2) + length (2) + header, padded with spaces to a multiple of 64 and
    // ended by a newline, as the format asks.
    let unpadded = 10 + header.len() + 1;
    header.push_str(&" ".repeat(unpadded.next_multiple_of(64) - unpadded));
    header.push('\n');
    let tmp = path.with_extension("npy.tmp");
    let write = || -> std::io::Result<()> {
        let mut f = std::io::BufWriter::new(std::fs::File::create(&tmp)?);
        f.write_all(b"\x93NUMPY\x01\x00")?;
        f.write_all(&(header.len() as u16).to_le_bytes())?;
        f.write_all(header.as_bytes())?;
        for v in values {
            f.write_all(&v.to_le_bytes())?;
        }
        f.into_inner()?.sync_all()?;
        std::fs::rename(&tmp, path)
    };
    write().with_context(|| format!("cannot write {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn npy_header_is_padded_and_data_follows() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.npy");
        let values: Vec<f32> = (0..6).map(|v| v as f32 * 0.5).collect();
        write_npy(&path, 2, 3, &values).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(&bytes[..8], b"\x93NUMPY\x01\x00");
        let len = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
        assert_eq!((10 + len) % 64, 0);
        let header = std::str::from_utf8(&bytes[10..10 + len]).unwrap();
        assert!(header.contains("'shape': (2, 3)"), "{header}");
        assert!(header.ends_with('\n'));
        let data: Vec<f32> = bytes[10 + len..]
            .chunks(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(data, values);
        assert!(write_npy(&path, 4, 3, &values).is_err());
    }
}
