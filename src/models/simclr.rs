//! The SimCLR model: an encoder and the projection MLP the contrastive loss sees.

use burn::nn::{Linear, LinearConfig};
use burn::prelude::*;
use burn::tensor::activation::relu;
use serde::{Deserialize, Serialize};

use super::{Encoder, EncoderConfig};
use crate::data::augment::ViewAugmentConfig;

/// `[simclr]` in a pipeline file: the model (encoder and projection MLP), the loss's temperature
/// and how views are drawn.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SimclrConfig {
    pub encoder: EncoderConfig,
    /// Width of the projection MLP's hidden layer.
    pub projection_hidden: usize,
    /// Size of the projection the loss compares (the encoder's features are what finetune uses).
    pub projection_dim: usize,
    /// NT-Xent temperature: lower sharpens the softmax over the batch.
    pub temperature: f64,
    pub augment: ViewAugmentConfig,
}

impl Default for SimclrConfig {
    fn default() -> Self {
        Self {
            encoder: EncoderConfig::default(),
            projection_hidden: 512,
            projection_dim: 128,
            temperature: 0.5,
            augment: ViewAugmentConfig::default(),
        }
    }
}

impl SimclrConfig {
    /// What fixes the weights' shapes (recorded in checkpoints): encoder and projection sizes.
    pub fn architecture(&self) -> serde_json::Value {
        serde_json::json!({
            "encoder": self.encoder,
            "projection_hidden": self.projection_hidden,
            "projection_dim": self.projection_dim,
        })
    }

    /// Builds the model on `device` with fresh weights.
    pub fn init<B: Backend>(&self, device: &B::Device) -> Simclr<B> {
        Simclr {
            encoder: self.encoder.init(device),
            projection_hidden: LinearConfig::new(
                self.encoder.feature_dim(),
                self.projection_hidden,
            )
            .init(device),
            projection_out: LinearConfig::new(self.projection_hidden, self.projection_dim)
                .init(device),
        }
    }
}

/// See [`SimclrConfig`].
#[derive(Module, Debug)]
pub struct Simclr<B: Backend> {
    pub encoder: Encoder<B>,
    pub projection_hidden: Linear<B>,
    pub projection_out: Linear<B>,
}

impl<B: Backend> Simclr<B> {
    /// The representation: `[batch, 1, 28, 28]` -> `[batch, feature_dim]`.
    pub fn embed(&self, images: Tensor<B, 4>) -> Tensor<B, 2> {
        self.encoder.forward(images)
    }

    /// The projection the loss compares: `[batch, feature_dim]` -> `[batch, projection_dim]`.
    pub fn project(&self, features: Tensor<B, 2>) -> Tensor<B, 2> {
        self.projection_out
            .forward(relu(self.projection_hidden.forward(features)))
    }
}
