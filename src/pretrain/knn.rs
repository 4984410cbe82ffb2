//! A k-nearest-neighbour classifier on embeddings: the dashboard number that shows whether
//! pretraining separates the classes. Reporting only: nothing is ever chosen by it.

use anyhow::Result;
use burn::prelude::*;

use super::contrastive::normalize_rows;
use crate::data::CLASS_NAMES;
use crate::models::host_values;

/// Accuracy of a cosine-similarity k-NN classifier: each row of `query` (`[q, d]`) is labelled by
/// the similarity-weighted vote of its `k` most similar rows of `bank` (`[b, d]`, labelled
/// `bank_labels`), and compared with `query_labels`. `NaN` when there is nothing to score.
///
/// # Panics
/// If the label slices do not have one label per row (a bug in the caller).
pub fn knn_accuracy<B: Backend>(
    bank: Tensor<B, 2>,
    bank_labels: &[u8],
    query: Tensor<B, 2>,
    query_labels: &[u8],
    k: usize,
) -> Result<f64> {
    let [b, _] = bank.dims();
    let [q, _] = query.dims();
    assert_eq!(b, bank_labels.len(), "one label per bank row");
    assert_eq!(q, query_labels.len(), "one label per query row");
    let k = k.min(b);
    if q == 0 || k == 0 {
        return Ok(f64::NAN);
    }
    let bank = normalize_rows(bank).transpose();
    let query = normalize_rows(query);
    let mut correct = 0usize;
    // Chunks bound the `[chunk, b]` similarity matrix.
    for start in (0..q).step_by(1024) {
        let len = (q - start).min(1024);
        let sims = query.clone().narrow(0, start, len).matmul(bank.clone());
        let (values, indices) = sims.topk_with_indices(k, 1);
        let values = host_values(values)?;
        let indices: Vec<i64> = indices
            .into_data()
            .convert::<i64>()
            .to_vec::<i64>()
            .map_err(|e| anyhow::anyhow!("cannot copy a tensor to the host: {e:?}"))?;
        for r in 0..len {
            let votes = vote(
                &values[r * k..(r + 1) * k],
                &indices[r * k..(r + 1) * k],
                bank_labels,
            );
            correct += (votes == query_labels[start + r]) as usize;
        }
    }
    Ok(correct as f64 / q as f64)
}

/// The class with the largest summed similarity among the neighbours (ties: the lower class).
fn vote(sims: &[f32], neighbours: &[i64], labels: &[u8]) -> u8 {
    let mut score = [0.0f64; CLASS_NAMES.len()];
    for (&s, &i) in sims.iter().zip(neighbours) {
        score[labels[i as usize] as usize] += s as f64;
    }
    let mut best = 0;
    for c in 1..score.len() {
        if score[c] > score[best] {
            best = c;
        }
    }
    best as u8
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::flex::FlexDevice;
    use burn::backend::Flex;

    fn tensor(rows: &[[f32; 3]]) -> Tensor<Flex, 2> {
        let flat: Vec<f32> = rows.iter().flatten().copied().collect();
        Tensor::from_data(TensorData::new(flat, [rows.len(), 3]), &FlexDevice)
    }

    #[test]
    fn neighbours_by_direction_vote() {
        // Class 0 points along x, class 1 along y; length must not matter (cosine).
        let bank = tensor(&[
            [1.0, 0.1, 0.0],
            [5.0, -0.2, 0.0],
            [0.0, 1.0, 0.1],
            [0.1, 3.0, 0.0],
        ]);
        let labels = [0, 0, 1, 1];
        let query = tensor(&[[10.0, 1.0, 0.0], [0.2, 0.5, 0.0], [0.0, -1.0, 0.0]]);
        // The third query points away from class 1: its 1-NN is a class-0 point.
        let acc = knn_accuracy(bank.clone(), &labels, query.clone(), &[0, 1, 1], 1).unwrap();
        assert!((acc - 2.0 / 3.0).abs() < 1e-9, "{acc}");
        let acc = knn_accuracy(bank, &labels, query, &[0, 1, 0], 1).unwrap();
        assert!((acc - 1.0).abs() < 1e-9, "{acc}");
    }

    #[test]
    fn votes_are_weighted_by_similarity() {
        assert_eq!(vote(&[0.9, 0.2, 0.2], &[0, 1, 2], &[3, 5, 5]), 3);
        assert_eq!(vote(&[0.3, 0.2, 0.2], &[0, 1, 2], &[3, 5, 5]), 5);
    }
}
