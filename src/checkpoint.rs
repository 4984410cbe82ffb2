//! Checkpoint files: a small container around burn records, written atomically.
//!
//! Layout: `b"FRUGALCK"`, version (u32 LE), header length (u64 LE), header (JSON), blob count
//! (u32 LE), then per blob a name (u32 LE length + UTF-8) and bytes (u64 LE length + data), and a
//! CRC-32C of everything before it. The header says what the checkpoint is (stage, method,
//! architecture, progress) so a wrong or damaged file is refused with a clear error before burn
//! ever sees its bytes.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use burn::module::Module;
use burn::record::{FullPrecisionSettings, NamedMpkBytesRecorder, Record, Recorder};
use burn::tensor::backend::Backend;
use serde::{Deserialize, Serialize};

use crate::tensorboard::record::crc32c;

const MAGIC: &[u8; 8] = b"FRUGALCK";
const VERSION: u32 = 1;

/// Why a checkpoint cannot be used. The file is never modified or overwritten on any of these.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("no checkpoint at {0}: nothing to resume (run without --resume to start this run)")]
    Missing(PathBuf),
    #[error("checkpoint {0} is empty (0 bytes); it was left as is: move it away to start over")]
    Empty(PathBuf),
    #[error("{0} is not a frugal checkpoint (wrong magic bytes)")]
    NotACheckpoint(PathBuf),
    #[error("checkpoint {path} has format version {found}; this frugal reads version {VERSION}")]
    Version { path: PathBuf, found: u32 },
    #[error("checkpoint {path} is corrupt ({what}); it was left as is")]
    Corrupt { path: PathBuf, what: String },
    #[error("checkpoint {path} holds {found}, but this run needs {expected}")]
    Mismatch {
        path: PathBuf,
        found: String,
        expected: String,
    },
    #[error("cannot read checkpoint {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// What a checkpoint holds besides its tensors.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CheckpointHeader {
    /// The stage that wrote it, e.g. `"pretrain"`.
    pub stage: String,
    /// The method, e.g. `"vae"`.
    pub method: String,
    /// The model's config, compared field by field before loading.
    pub architecture: serde_json::Value,
    /// Epochs completed.
    pub epoch: u64,
    /// Batches of epoch `epoch` already trained on (0 at an epoch boundary).
    pub batch_in_epoch: u64,
    /// Optimizer steps taken in all.
    pub global_step: u64,
    /// Seed of every RNG stream; with the counters above it is the complete RNG state
    /// (see `data::batch::rng_for`).
    pub seed: u64,
    /// Wall-clock seconds of training so far (for images/s over resumed runs).
    pub train_seconds: f64,
    /// True once the last epoch finished.
    pub finished: bool,
    /// The frugal version that wrote it.
    pub frugal_version: String,
    /// Method-specific progress (e.g. running sums of the current epoch's losses).
    #[serde(default)]
    pub extra: serde_json::Value,
}

/// A header plus named blobs (burn records as bytes).
#[derive(Debug, Clone)]
pub struct Checkpoint {
    pub header: CheckpointHeader,
    pub blobs: Vec<(String, Vec<u8>)>,
}

impl Checkpoint {
    /// Serialises to the container layout.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let header = serde_json::to_vec(&self.header)?;
        let mut out = Vec::new();
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&(header.len() as u64).to_le_bytes());
        out.extend_from_slice(&header);
        out.extend_from_slice(&(self.blobs.len() as u32).to_le_bytes());
        for (name, bytes) in &self.blobs {
            out.extend_from_slice(&(name.len() as u32).to_le_bytes());
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(&(bytes.len() as u64).to_le_bytes());
            out.extend_from_slice(bytes);
        }
        let crc = crc32c(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        Ok(out)
    }

    /// Parses and verifies a container read from `path`.
    pub fn from_bytes(path: &Path, bytes: &[u8]) -> Result<Self, CheckpointError> {
        let corrupt = |what: &str| CheckpointError::Corrupt {
            path: path.into(),
            what: what.into(),
        };
        if bytes.is_empty() {
            return Err(CheckpointError::Empty(path.into()));
        }
        if bytes.len() < 8 || &bytes[..8] != MAGIC {
            return Err(CheckpointError::NotACheckpoint(path.into()));
        }
        if bytes.len() < 16 {
            return Err(corrupt("truncated header"));
        }
        let (body, crc) = bytes.split_at(bytes.len() - 4);
        let mut r = Reader {
            bytes: body,
            pos: 8,
        };
        let version = r.u32().ok_or_else(|| corrupt("truncated header"))?;
        if version != VERSION {
            return Err(CheckpointError::Version {
                path: path.into(),
                found: version,
            });
        }
        if crc32c(body).to_le_bytes() != crc {
            return Err(corrupt(
                "checksum mismatch: the file was truncated or damaged",
            ));
        }
        let header_len = r.u64().ok_or_else(|| corrupt("truncated header"))? as usize;
        let header = r
            .take(header_len)
            .ok_or_else(|| corrupt("truncated header"))?;
        let header: CheckpointHeader = serde_json::from_slice(header)
            .map_err(|e| corrupt(&format!("unreadable header: {e}")))?;
        let count = r.u32().ok_or_else(|| corrupt("truncated blob table"))?;
        let mut blobs = Vec::new();
        for _ in 0..count {
            let name_len = r.u32().ok_or_else(|| corrupt("truncated blob"))? as usize;
            let name = r.take(name_len).ok_or_else(|| corrupt("truncated blob"))?;
            let name = String::from_utf8(name.to_vec()).map_err(|_| corrupt("bad blob name"))?;
            let len = r.u64().ok_or_else(|| corrupt("truncated blob"))? as usize;
            let data = r.take(len).ok_or_else(|| corrupt("truncated blob"))?;
            blobs.push((name, data.to_vec()));
        }
        if r.pos != body.len() {
            return Err(corrupt("unexpected bytes after the last blob"));
        }
        Ok(Self { header, blobs })
    }

    /// Writes atomically: a reader sees the old file or the new one, never a mix.
    pub fn save(&self, path: &Path) -> Result<()> {
        write_atomic(path, &self.to_bytes()?)
    }

    /// Reads and verifies `path`.
    pub fn load(path: &Path) -> Result<Self, CheckpointError> {
        let bytes = std::fs::read(path).map_err(|source| {
            if source.kind() == std::io::ErrorKind::NotFound {
                CheckpointError::Missing(path.into())
            } else {
                CheckpointError::Io {
                    path: path.into(),
                    source,
                }
            }
        })?;
        Self::from_bytes(path, &bytes)
    }

    /// The blob called `name`.
    pub fn blob(&self, path: &Path, name: &str) -> Result<&[u8], CheckpointError> {
        self.blobs
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, b)| b.as_slice())
            .ok_or_else(|| CheckpointError::Corrupt {
                path: path.into(),
                what: format!("no `{name}` section"),
            })
    }

    /// Refuses a checkpoint of another stage, method or architecture, naming both sides.
    pub fn expect(
        &self,
        path: &Path,
        stage: &str,
        method: &str,
        architecture: &serde_json::Value,
    ) -> Result<(), CheckpointError> {
        let h = &self.header;
        if h.stage != stage || h.method != method || &h.architecture != architecture {
            return Err(CheckpointError::Mismatch {
                path: path.into(),
                found: format!(
                    "a {} {} model {}",
                    h.method,
                    h.stage,
                    compact(&h.architecture)
                ),
                expected: format!("a {method} {stage} model {}", compact(architecture)),
            });
        }
        Ok(())
    }
}

fn compact(v: &serde_json::Value) -> String {
    serde_json::to_string(v).unwrap_or_default()
}

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.pos.checked_add(n)?;
        let s = self.bytes.get(self.pos..end)?;
        self.pos = end;
        Some(s)
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }
    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }
}

/// The recorder for checkpoint blobs: full precision, self-describing, errors instead of panics.
type BlobRecorder = NamedMpkBytesRecorder<FullPrecisionSettings>;

/// A burn record (a module's or an optimizer's) as bytes.
pub fn record_to_bytes<B: Backend, R: Record<B>>(record: R) -> Result<Vec<u8>> {
    Recorder::<B>::record(&BlobRecorder::default(), record, ()).context("cannot serialise record")
}

/// A burn record back from bytes.
pub fn record_from_bytes<B: Backend, R: Record<B>>(bytes: &[u8], device: &B::Device) -> Result<R> {
    Recorder::<B>::load(&BlobRecorder::default(), bytes.to_vec(), device)
        .map_err(|e| anyhow::anyhow!("cannot decode record: {e}"))
}

/// A module's weights as bytes.
pub fn module_to_bytes<B: Backend, M: Module<B>>(module: M) -> Result<Vec<u8>> {
    record_to_bytes::<B, _>(module.into_record())
}

/// Writes `bytes` to `path` through a temporary file in the same directory, `fsync` and rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp.{}", std::process::id()));
    let result = (|| -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        // Make the rename itself durable.
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.with_context(|| format!("cannot write {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Checkpoint {
        Checkpoint {
            header: CheckpointHeader {
                stage: "pretrain".into(),
                method: "vae".into(),
                architecture: serde_json::json!({"latent_dim": 8}),
                epoch: 1,
                batch_in_epoch: 3,
                global_step: 10,
                seed: 5,
                train_seconds: 1.5,
                finished: false,
                frugal_version: "test".into(),
                extra: serde_json::Value::Null,
            },
            blobs: vec![
                ("model".into(), vec![1, 2, 3]),
                ("optimizer".into(), vec![]),
            ],
        }
    }

    #[test]
    fn roundtrip_and_every_kind_of_damage() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("checkpoint.bin");
        sample().save(&path).unwrap();
        let back = Checkpoint::load(&path).unwrap();
        assert_eq!(back.header, sample().header);
        assert_eq!(back.blob(&path, "model").unwrap(), &[1, 2, 3]);

        let bytes = std::fs::read(&path).unwrap();
        let p = Path::new("x.bin");
        assert!(matches!(
            Checkpoint::from_bytes(p, &[]),
            Err(CheckpointError::Empty(_))
        ));
        assert!(matches!(
            Checkpoint::from_bytes(p, b"PK\x03\x04 not ours"),
            Err(CheckpointError::NotACheckpoint(_))
        ));
        for cut in [9, 20, bytes.len() / 2, bytes.len() - 1] {
            let err = Checkpoint::from_bytes(p, &bytes[..cut]).unwrap_err();
            assert!(
                matches!(err, CheckpointError::Corrupt { .. }),
                "cut {cut}: {err}"
            );
        }
        let mut flipped = bytes.clone();
        flipped[30] ^= 0x40;
        assert!(matches!(
            Checkpoint::from_bytes(p, &flipped),
            Err(CheckpointError::Corrupt { .. })
        ));
        assert!(matches!(
            Checkpoint::load(&dir.path().join("nope")),
            Err(CheckpointError::Missing(_))
        ));

        let arch = serde_json::json!({"latent_dim": 8});
        assert!(back.expect(&path, "pretrain", "vae", &arch).is_ok());
        let err = back
            .expect(
                &path,
                "pretrain",
                "vae",
                &serde_json::json!({"latent_dim": 16}),
            )
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("latent_dim\":8") && err.contains("latent_dim\":16"),
            "{err}"
        );
    }
}
