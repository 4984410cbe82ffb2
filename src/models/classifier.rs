//! The classifier fine-tuned on bought labels: the pretrained encoder (when it trains) and a
//! two-layer or linear head.

use burn::nn::{Linear, LinearConfig};
use burn::prelude::*;
use burn::tensor::activation::relu;

use super::Encoder;

/// What the classifier reads.
pub enum ClassifierInput<B: Backend> {
    /// Encoder features computed beforehand (frozen encoder), `[batch, feature_dim]`.
    Features(Tensor<B, 2>),
    /// Images, `[batch, 1, 28, 28]`, through the classifier's own (trainable) encoder.
    Images(Tensor<B, 4>),
}

/// `[features] -> Linear(hidden) -> ReLU -> dropout -> Linear(classes)` (or, with no hidden layer,
/// the linear head `[features] -> dropout -> Linear(classes)`), after an optional encoder.
/// Dropout takes its mask from the caller ([`Classifier::forward`]) so that training and MC-dropout
/// scoring draw reproducible masks from the run's seed on every backend, and so that MC dropout
/// also works on a backend without autodiff.
#[derive(Module, Debug)]
pub struct Classifier<B: Backend> {
    /// `None` when the encoder is frozen and its features are precomputed.
    pub encoder: Option<Encoder<B>>,
    /// `None`: a linear head.
    pub hidden: Option<Linear<B>>,
    pub out: Linear<B>,
}

impl<B: Backend> Classifier<B> {
    /// A fresh head of width `hidden` (0: linear) for `feature_dim` inputs and `classes` outputs,
    /// on `encoder`.
    pub fn new(
        encoder: Option<Encoder<B>>,
        feature_dim: usize,
        hidden: usize,
        classes: usize,
        device: &B::Device,
    ) -> Self {
        let (hidden, width) = match hidden {
            0 => (None, feature_dim),
            h => (Some(LinearConfig::new(feature_dim, h).init(device)), h),
        };
        Self {
            encoder,
            hidden,
            out: LinearConfig::new(width, classes).init(device),
        }
    }

    /// Width of the embedding: the hidden layer's, or the features' for a linear head.
    pub fn embedding_dim(&self) -> usize {
        self.out.weight.dims()[0]
    }

    /// The embedding (hidden activations after ReLU; the features for a linear head),
    /// `[batch, embedding_dim]`.
    ///
    /// # Panics
    /// If `input` does not fit the classifier (images without an encoder, features with one):
    /// a bug in the caller, which builds both from the same `--freeze` setting.
    pub fn embed(&self, input: ClassifierInput<B>) -> Tensor<B, 2> {
        let features = match (input, &self.encoder) {
            (ClassifierInput::Features(f), None) => f,
            (ClassifierInput::Images(x), Some(encoder)) => encoder.forward(x),
            (ClassifierInput::Images(x), None) => {
                panic!("classifier without encoder given images {:?}", x.dims())
            }
            (ClassifierInput::Features(f), Some(_)) => {
                panic!("classifier with encoder given features {:?}", f.dims())
            }
        };
        match &self.hidden {
            Some(hidden) => relu(hidden.forward(features)),
            None => features,
        }
    }

    /// Logits `[batch, classes]` from an embedding `[batch, embedding_dim]`; `keep_mask` (same shape,
    /// entries 0 or `1 / (1 - p)`) applies dropout, `None` is the deterministic prediction.
    pub fn logits(&self, embedding: Tensor<B, 2>, keep_mask: Option<Tensor<B, 2>>) -> Tensor<B, 2> {
        match keep_mask {
            Some(mask) => self.out.forward(embedding * mask),
            None => self.out.forward(embedding),
        }
    }

    /// Logits `[batch, classes]`.
    pub fn forward(
        &self,
        input: ClassifierInput<B>,
        keep_mask: Option<Tensor<B, 2>>,
    ) -> Tensor<B, 2> {
        self.logits(self.embed(input), keep_mask)
    }
}
