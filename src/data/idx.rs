//! Strict reader for the IDX format of (Fashion-)MNIST, raw or gzipped.
//!
//! Layout: magic `00 00 <type> <ndims>` (type 0x08 = u8), `ndims` big-endian u32 sizes, then the
//! data. Every check failure names the file and what is wrong.

use std::io::Read;
use std::path::{Path, PathBuf};

/// What can be wrong with an IDX file.
#[derive(Debug, thiserror::Error)]
pub enum IdxError {
    #[error("{path}: cannot read: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: corrupt or truncated gzip stream ({source})")]
    Gzip {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: file too short for an IDX header ({len} bytes)")]
    ShortHeader { path: PathBuf, len: usize },
    #[error("{path}: wrong magic number 0x{found:08x}, expected 0x{expected:08x} (IDX, unsigned bytes, {dims} dimension(s))")]
    Magic {
        path: PathBuf,
        found: u32,
        expected: u32,
        dims: u8,
    },
    #[error("{path}: items are {found}, expected {expected}")]
    Shape {
        path: PathBuf,
        found: String,
        expected: String,
    },
    #[error("{path}: truncated: the header announces {items} items ({expected} data bytes) but the file holds {actual}")]
    Truncated {
        path: PathBuf,
        items: usize,
        expected: usize,
        actual: usize,
    },
    #[error("{path}: {extra} unexpected bytes after the {items} items the header announces")]
    TrailingBytes {
        path: PathBuf,
        items: usize,
        extra: usize,
    },
    #[error("{path}: label {label} at index {index} is out of range 0..{classes}")]
    LabelRange {
        path: PathBuf,
        index: usize,
        label: u8,
        classes: usize,
    },
}

/// Images of one IDX file: `count` items of `rows x cols` bytes, row-major.
#[derive(Debug, Clone)]
pub struct IdxImages {
    pub rows: usize,
    pub cols: usize,
    pub pixels: Vec<u8>,
}

impl IdxImages {
    /// Number of images.
    pub fn len(&self) -> usize {
        self.pixels.len() / (self.rows * self.cols).max(1)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Reads a whole file, un-gzipping it when it starts with the gzip magic (whatever its name).
fn read_maybe_gz(path: &Path) -> Result<Vec<u8>, IdxError> {
    let raw = std::fs::read(path).map_err(|source| IdxError::Io {
        path: path.into(),
        source,
    })?;
    if raw.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::with_capacity(raw.len() * 4);
        flate2::read::MultiGzDecoder::new(raw.as_slice())
            .read_to_end(&mut out)
            .map_err(|source| IdxError::Gzip {
                path: path.into(),
                source,
            })?;
        Ok(out)
    } else {
        Ok(raw)
    }
}

/// Parses the header; returns the dimension sizes and the data.
fn parse(path: &Path, bytes: &[u8], ndims: u8) -> Result<(Vec<usize>, Vec<u8>), IdxError> {
    let header_len = 4 + 4 * ndims as usize;
    if bytes.len() < header_len {
        return Err(IdxError::ShortHeader {
            path: path.into(),
            len: bytes.len(),
        });
    }
    let magic = u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
    let expected = 0x0000_0800 | ndims as u32;
    if magic != expected {
        return Err(IdxError::Magic {
            path: path.into(),
            found: magic,
            expected,
            dims: ndims,
        });
    }
    let dims: Vec<usize> = (0..ndims as usize)
        .map(|i| {
            let o = 4 + 4 * i;
            u32::from_be_bytes([bytes[o], bytes[o + 1], bytes[o + 2], bytes[o + 3]]) as usize
        })
        .collect();
    let items = dims[0];
    let expected_len = dims.iter().product::<usize>();
    let data = &bytes[header_len..];
    if data.len() < expected_len {
        return Err(IdxError::Truncated {
            path: path.into(),
            items,
            expected: expected_len,
            actual: data.len(),
        });
    }
    if data.len() > expected_len {
        return Err(IdxError::TrailingBytes {
            path: path.into(),
            items,
            extra: data.len() - expected_len,
        });
    }
    Ok((dims, data.to_vec()))
}

/// Reads an image file (magic 0x00000803) whose images are `rows x cols`.
pub fn read_images(path: &Path, rows: usize, cols: usize) -> Result<IdxImages, IdxError> {
    let bytes = read_maybe_gz(path)?;
    let (dims, pixels) = parse(path, &bytes, 3)?;
    if dims[1] != rows || dims[2] != cols {
        return Err(IdxError::Shape {
            path: path.into(),
            found: format!("{}x{}", dims[1], dims[2]),
            expected: format!("{rows}x{cols}"),
        });
    }
    Ok(IdxImages { rows, cols, pixels })
}

/// Reads a label file (magic 0x00000801); every label must be `< classes`.
pub fn read_labels(path: &Path, classes: usize) -> Result<Vec<u8>, IdxError> {
    let bytes = read_maybe_gz(path)?;
    let (_, labels) = parse(path, &bytes, 1)?;
    if let Some((index, &label)) = labels
        .iter()
        .enumerate()
        .find(|(_, &l)| l as usize >= classes)
    {
        return Err(IdxError::LabelRange {
            path: path.into(),
            index,
            label,
            classes,
        });
    }
    Ok(labels)
}

/// Encodes an IDX file of u8 data (used by tests and by tools that slice the dataset).
pub fn encode(dims: &[usize], data: &[u8]) -> Vec<u8> {
    let mut out = vec![0, 0, 0x08, dims.len() as u8];
    for &d in dims {
        out.extend_from_slice(&(d as u32).to_be_bytes());
    }
    out.extend_from_slice(data);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn gz(bytes: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(bytes).unwrap();
        e.finish().unwrap()
    }

    fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    }

    #[test]
    fn reads_raw_and_gz() {
        let dir = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..3 * 4 * 5).map(|i| i as u8).collect();
        let idx = encode(&[3, 4, 5], &data);
        for (name, bytes) in [("a", idx.clone()), ("a.gz", gz(&idx))] {
            let imgs = read_images(&write(dir.path(), name, &bytes), 4, 5).unwrap();
            assert_eq!((imgs.len(), imgs.rows, imgs.cols), (3, 4, 5));
            assert_eq!(imgs.pixels, data);
        }
        let labels = read_labels(
            &write(dir.path(), "l.gz", &gz(&encode(&[3], &[0, 9, 4]))),
            10,
        );
        assert_eq!(labels.unwrap(), vec![0, 9, 4]);
    }

    #[test]
    fn rejects_bad_files_with_the_file_named() {
        let dir = tempfile::tempdir().unwrap();
        let idx = encode(&[3, 4, 5], &[0u8; 60]);
        let cases: Vec<(&str, Vec<u8>, &str)> = vec![
            (
                "magic",
                encode(&[60], &[0u8; 60]),
                "wrong magic number 0x00000801",
            ),
            ("short", vec![0, 0, 8], "too short"),
            (
                "trunc",
                idx[..idx.len() - 1].to_vec(),
                "truncated: the header announces 3 items",
            ),
            (
                "trail",
                [idx.clone(), vec![1]].concat(),
                "1 unexpected bytes",
            ),
            ("gz", gz(&idx)[..20].to_vec(), "corrupt or truncated gzip"),
            (
                "shape",
                encode(&[3, 5, 4], &[0u8; 60]),
                "items are 5x4, expected 4x5",
            ),
        ];
        for (name, bytes, want) in cases {
            let path = write(dir.path(), name, &bytes);
            let err = read_images(&path, 4, 5).unwrap_err().to_string();
            assert!(err.contains(want), "{name}: {err}");
            assert!(err.contains(&path.display().to_string()), "{name}: {err}");
        }
        let err = read_labels(&write(dir.path(), "lab", &encode(&[2], &[1, 10])), 10).unwrap_err();
        assert!(err.to_string().contains("label 10 at index 1"), "{err}");
        let err = read_images(&dir.path().join("missing"), 4, 5).unwrap_err();
        assert!(err.to_string().contains("cannot read"), "{err}");
    }
}
