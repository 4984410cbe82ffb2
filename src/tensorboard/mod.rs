//! A TensorBoard event-file writer of our own: scalars, grayscale images, histograms and the
//! embedding projector.
//!
//! Why not `tensorboard-rs`: it loses data on flush, truncates other writers' files, panics on
//! grayscale images and has no histograms (see `shared/notes/tensorboard.md`). The format is small:
//! TFRecord-framed `Event` protobufs ([`record`], [`proto`]).
//!
//! Writes are synchronous: every event goes into the file's buffer as it is added, and after
//! [`EventWriter::flush`] returns it is on disk (`fsync`).

mod image;
mod projector;
pub mod proto;
pub mod record;

pub use image::{image_grid, GrayImage};
pub use projector::{write_projector, Embedding};

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{Context, Result};
use prost::Message;

use proto::{Event, HistogramProto, SessionLog, Summary, SummaryImage, SummaryValue};

/// Appends events to a new `events.out.tfevents.*` file in a log directory.
pub struct EventWriter {
    path: PathBuf,
    file: BufWriter<File>,
}

impl EventWriter {
    /// Creates a new event file in `dir` (created if missing). The name carries seconds, host, pid
    /// and a counter, and the file is opened with `create_new`: another writer's file is never
    /// truncated.
    pub fn create(dir: &Path) -> Result<Self> {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create log directory {}", dir.display()))?;
        let secs = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let host = gethostname::gethostname()
            .to_string_lossy()
            .replace(['/', '\\'], "_");
        let path = dir.join(format!(
            "events.out.tfevents.{secs}.{host}.{}.{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .with_context(|| format!("cannot create event file {}", path.display()))?;
        let mut writer = Self {
            path,
            file: BufWriter::new(file),
        };
        writer.write_event(Event {
            wall_time: now(),
            file_version: Some("brain.Event:2".into()),
            ..Default::default()
        })?;
        writer.flush()?;
        Ok(writer)
    }

    /// Path of the event file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn write_event(&mut self, event: Event) -> Result<()> {
        let bytes = record::frame(&event.encode_to_vec());
        self.file
            .write_all(&bytes)
            .with_context(|| format!("cannot write to {}", self.path.display()))
    }

    fn write_value(&mut self, step: u64, value: SummaryValue) -> Result<()> {
        self.write_event(Event {
            wall_time: now(),
            step: step as i64,
            summary: Some(Summary { value: vec![value] }),
            ..Default::default()
        })
    }

    /// A scalar: `tag` at `step`.
    pub fn add_scalar(&mut self, tag: &str, value: f32, step: u64) -> Result<()> {
        self.write_value(
            step,
            SummaryValue {
                tag: tag.into(),
                simple_value: Some(value),
                ..Default::default()
            },
        )
    }

    /// A grayscale image, stored as PNG.
    pub fn add_image(&mut self, tag: &str, image: &GrayImage, step: u64) -> Result<()> {
        let png = image.to_png()?;
        self.write_value(
            step,
            SummaryValue {
                tag: tag.into(),
                image: Some(SummaryImage {
                    height: image.height as i32,
                    width: image.width as i32,
                    colorspace: 1,
                    encoded_image_string: png,
                }),
                ..Default::default()
            },
        )
    }

    /// A histogram of `values` over `buckets` equal-width buckets between their min and max.
    /// Non-finite values are left out (and would show up as a NaN loss long before).
    pub fn add_histogram(
        &mut self,
        tag: &str,
        values: &[f32],
        buckets: usize,
        step: u64,
    ) -> Result<()> {
        let histo = histogram(values, buckets);
        self.write_value(
            step,
            SummaryValue {
                tag: tag.into(),
                histo: Some(histo),
                ..Default::default()
            },
        )
    }

    /// Marks a restart at `step`: TensorBoard then discards events at steps >= `step` that an
    /// interrupted process wrote after its last checkpoint.
    pub fn add_session_start(&mut self, step: u64) -> Result<()> {
        self.write_event(Event {
            wall_time: now(),
            step: step as i64,
            session_log: Some(SessionLog {
                status: proto::SESSION_START,
                ..Default::default()
            }),
            ..Default::default()
        })
    }

    /// Writes the buffer out and `fsync`s the file: after this returns, every event is on disk.
    pub fn flush(&mut self) -> Result<()> {
        self.file
            .flush()
            .and_then(|_| self.file.get_ref().sync_data())
            .with_context(|| format!("cannot flush {}", self.path.display()))
    }
}

impl Drop for EventWriter {
    fn drop(&mut self) {
        let _ = self.flush();
    }
}

fn now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// Summary statistics and equal-width buckets, in TensorBoard's `HistogramProto` form.
pub fn histogram(values: &[f32], buckets: usize) -> HistogramProto {
    let finite: Vec<f64> = values
        .iter()
        .filter(|v| v.is_finite())
        .map(|&v| v as f64)
        .collect();
    let buckets = buckets.max(1);
    if finite.is_empty() {
        return HistogramProto::default();
    }
    let min = finite.iter().cloned().fold(f64::INFINITY, f64::min);
    let max = finite.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let width = if max > min {
        (max - min) / buckets as f64
    } else {
        1.0
    };
    let mut counts = vec![0.0; buckets];
    for &v in &finite {
        let i = (((v - min) / width) as usize).min(buckets - 1);
        counts[i] += 1.0;
    }
    let mut limits: Vec<f64> = (1..=buckets).map(|i| min + width * i as f64).collect();
    limits[buckets - 1] = limits[buckets - 1].max(max);
    HistogramProto {
        min,
        max,
        num: finite.len() as f64,
        sum: finite.iter().sum(),
        sum_squares: finite.iter().map(|v| v * v).sum(),
        bucket_limit: limits,
        bucket: counts,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_read_back_after_flush() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = EventWriter::create(dir.path()).unwrap();
        for step in 0..100 {
            w.add_scalar("loss", step as f32 * 0.5, step).unwrap();
        }
        w.add_histogram("w", &[1.0, 2.0, 2.0, 3.0, f32::NAN], 4, 7)
            .unwrap();
        w.flush().unwrap();
        // Read while the writer is still alive: flush alone must have put everything on disk.
        let records = record::unframe(&std::fs::read(w.path()).unwrap()).unwrap();
        assert_eq!(records.len(), 1 + 100 + 1);
        let first = Event::decode(records[0].as_slice()).unwrap();
        assert_eq!(first.file_version.as_deref(), Some("brain.Event:2"));
        let e = Event::decode(records[42].as_slice()).unwrap();
        assert_eq!(e.step, 41);
        let v = &e.summary.unwrap().value[0];
        assert_eq!((v.tag.as_str(), v.simple_value), ("loss", Some(20.5)));
        let h = Event::decode(records[101].as_slice())
            .unwrap()
            .summary
            .unwrap()
            .value[0]
            .histo
            .clone()
            .unwrap();
        assert_eq!((h.min, h.max, h.num, h.sum), (1.0, 3.0, 4.0, 8.0));
        assert_eq!(h.bucket.iter().sum::<f64>(), 4.0);
        assert_eq!(h.bucket, vec![1.0, 0.0, 2.0, 1.0]);
    }

    #[test]
    fn two_writers_in_one_directory_keep_both_files() {
        let dir = tempfile::tempdir().unwrap();
        let mut a = EventWriter::create(dir.path()).unwrap();
        let mut b = EventWriter::create(dir.path()).unwrap();
        a.add_scalar("a", 1.0, 0).unwrap();
        b.add_scalar("b", 2.0, 0).unwrap();
        a.flush().unwrap();
        b.flush().unwrap();
        assert_ne!(a.path(), b.path());
        for w in [&a, &b] {
            assert_eq!(
                record::unframe(&std::fs::read(w.path()).unwrap())
                    .unwrap()
                    .len(),
                2
            );
        }
    }
}
