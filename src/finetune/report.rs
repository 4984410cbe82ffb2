//! What a finetune run reports: per-class accuracy, the confusion matrix (numbers and image),
//! `predictions.csv` and `summary.json`.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::Result;
use serde::{Deserialize, Serialize};

use super::train::argmax;
use crate::data::CLASS_NAMES;
use crate::tensorboard::GrayImage;

/// `matrix[true][predicted]` counts over the test set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConfusionMatrix {
    pub matrix: Vec<Vec<u64>>,
}

impl ConfusionMatrix {
    /// From class probabilities (`n * classes`) and the true labels.
    pub fn new(probs: &[f32], labels: &[u8]) -> Self {
        let c = CLASS_NAMES.len();
        let mut matrix = vec![vec![0u64; c]; c];
        for (row, &label) in probs.chunks(c).zip(labels) {
            matrix[label as usize][argmax(row)] += 1;
        }
        Self { matrix }
    }

    pub fn accuracy(&self) -> f64 {
        let total: u64 = self.matrix.iter().flatten().sum();
        let correct: u64 = (0..self.matrix.len()).map(|i| self.matrix[i][i]).sum();
        correct as f64 / total.max(1) as f64
    }

    /// Recall of each class (the share of its images predicted as it).
    pub fn per_class(&self) -> Vec<f64> {
        self.matrix
            .iter()
            .enumerate()
            .map(|(i, row)| row[i] as f64 / row.iter().sum::<u64>().max(1) as f64)
            .collect()
    }

    /// A heat map: one square per cell, brightness = share of the true class's images (rows:
    /// true class, columns: predicted), so the diagonal is recall and off-diagonal cells show what
    /// gets confused with what.
    pub fn image(&self, cell: usize) -> GrayImage {
        let c = self.matrix.len();
        let side = c * cell;
        let mut pixels = vec![0u8; side * side];
        for (i, row) in self.matrix.iter().enumerate() {
            let total = row.iter().sum::<u64>().max(1) as f64;
            for (j, &v) in row.iter().enumerate() {
                // Square root so that small confusions stay visible next to the diagonal.
                let g = ((v as f64 / total).sqrt() * 255.0).round() as u8;
                for y in i * cell..(i + 1) * cell - 1 {
                    for x in j * cell..(j + 1) * cell - 1 {
                        pixels[y * side + x] = g;
                    }
                }
            }
        }
        GrayImage {
            width: side,
            height: side,
            pixels,
        }
    }

    /// A text table for the log.
    pub fn table(&self) -> String {
        let mut s = String::from("true \\ predicted ");
        for name in CLASS_NAMES {
            let _ = write!(s, "{:>6}", &name[..name.len().min(5)]);
        }
        s.push('\n');
        for (i, row) in self.matrix.iter().enumerate() {
            let _ = write!(s, "{:<17}", CLASS_NAMES[i]);
            for v in row {
                let _ = write!(s, "{v:>6}");
            }
            s.push('\n');
        }
        s
    }
}

/// `predictions.csv`: `test_index,predicted,confidence` per test image (index in the test file).
pub fn write_predictions(path: &Path, probs: &[f32]) -> Result<()> {
    let c = CLASS_NAMES.len();
    let mut out = String::from("test_index,predicted,confidence\n");
    for (i, row) in probs.chunks(c).enumerate() {
        let p = argmax(row);
        let _ = writeln!(out, "{i},{p},{:.6}", row[p]);
    }
    crate::checkpoint::write_atomic(path, out.as_bytes())
}

/// What a finished run reports (`summary.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FinetuneSummary {
    pub run_dir: String,
    pub device: String,
    /// Pretraining method and encoder config of the encoder run.
    pub encoder: serde_json::Value,
    pub encoder_run: String,
    pub strategy: String,
    pub cold_start: String,
    pub freeze: String,
    pub seed: u64,
    pub labels_budget: u64,
    /// Read from the label database's ledger at the end.
    pub labels_bought: u64,
    pub rounds: u32,
    /// Bought labels used for training / held out for validation in the last round.
    pub train_labels: usize,
    pub validation_labels: usize,
    #[serde(deserialize_with = "nan_from_null")]
    pub validation_accuracy: f64,
    /// Labels of the audit slice (`labels.validation = "audit"`), and the final model's accuracy
    /// on them: bought labels that no training or choice has seen.
    #[serde(default)]
    pub audit_labels: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audit_accuracy: Option<f64>,
    pub test_images: usize,
    pub test_accuracy: f64,
    pub per_class_accuracy: serde_json::Map<String, serde_json::Value>,
    pub bought_per_class: serde_json::Map<String, serde_json::Value>,
    pub confusion_matrix: Vec<Vec<u64>>,
    /// Wall-clock seconds of all sessions of this run.
    pub seconds: f64,
    /// The semi-supervised stage, when it ran (`test_accuracy` is then its model's).
    #[serde(default)]
    pub semi: Option<SemiSummary>,
    /// With `semi.test_time_flip` (`test_accuracy` and `audit_accuracy` are then the flipped
    /// predictions'): the same model's figures without the flip, so one run compares both.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub test_time_flip: Option<FlipSummary>,
    /// With `--join`: each member's figures alone (the figures above are the ensemble's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub join: Option<super::join::JoinSummary>,
    /// The effective config.
    pub config: serde_json::Value,
}

/// The final classifier's accuracies without the test-time flip (report; the audit figure judges
/// the flip on bought labels).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FlipSummary {
    pub test_accuracy_without: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audit_accuracy_without: Option<f64>,
}

/// How the semi-supervised stage went.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SemiSummary {
    pub method: String,
    pub steps: u64,
    /// Passes over the unlabeled pool.
    pub passes: f64,
    /// The step whose weights were kept (the last, or the best validation, as `semi.keep` says).
    pub kept_step: u64,
    /// Bought labels the stage trained on (the validation slice too with `semi.train_on_validation`).
    #[serde(default)]
    pub bought_labels_trained: usize,
    #[serde(deserialize_with = "nan_from_null")]
    pub validation_accuracy: f64,
    /// Test accuracy of the last round's classifier, before the stage (report only).
    pub test_accuracy_before: f64,
    #[serde(deserialize_with = "nan_from_null")]
    pub validation_accuracy_before: f64,
    /// Accuracy on the audit slice after and before the stage, when there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audit_accuracy: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audit_accuracy_before: Option<f64>,
    /// Wall-clock seconds of the stage, every member's.
    pub seconds: f64,
    /// Stage members (`semi.members`) whose predictions the figures above average; `steps`,
    /// `passes` and `kept_step` are each member's.
    #[serde(default = "one")]
    pub members: usize,
    /// With more than one member: each member's own test accuracy (report only) and audit
    /// accuracy, in order, without the test-time flip like the figures above.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub member_test_accuracy: Vec<f64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub member_audit_accuracy: Vec<f64>,
}

fn one() -> usize {
    1
}

/// `{class name: value}` in class order.
/// Deserializes a number that JSON wrote as `null` (serde_json writes NaN so) back as NaN: the
/// validation figures of a run without validation labels.
pub fn nan_from_null<'de, D: serde::Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}

pub fn per_class_map<T: Into<serde_json::Value> + Copy>(
    values: &[T],
) -> serde_json::Map<String, serde_json::Value> {
    CLASS_NAMES
        .iter()
        .zip(values)
        .map(|(n, &v)| (n.to_string(), v.into()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn confusion_matrix_counts_and_accuracy() {
        let mut probs = vec![0.0f32; 4 * 10];
        // Predictions 0, 1, 1, 3 for labels 0, 1, 2, 3.
        for (i, p) in [0usize, 1, 1, 3].iter().enumerate() {
            probs[i * 10 + p] = 0.9;
        }
        let cm = ConfusionMatrix::new(&probs, &[0, 1, 2, 3]);
        assert_eq!(cm.matrix[2][1], 1);
        assert_eq!(cm.accuracy(), 0.75);
        assert_eq!(cm.per_class()[2], 0.0);
        assert_eq!(cm.per_class()[3], 1.0);
        let img = cm.image(8);
        assert_eq!((img.width, img.height), (80, 80));
        assert_eq!(img.pixels[0], 255);
        assert!(cm.table().contains("Ankle boot"));
    }
}
