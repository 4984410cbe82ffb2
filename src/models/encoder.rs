//! The convolutional encoder shared by the pretraining methods and the classifier.

use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::PaddingConfig2d;
use burn::prelude::*;
use burn::tensor::activation::relu;
use serde::{Deserialize, Serialize};

/// Three conv layers: `1 -> c0` (3x3, stride 1), `c0 -> c1` (4x4, stride 2), `c1 -> c2` (4x4,
/// stride 2), each followed by ReLU. A 28x28 image becomes `c2 x 7 x 7` features.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConvEncoderConfig {
    /// Output channels of the three conv layers.
    pub channels: [usize; 3],
}

impl Default for ConvEncoderConfig {
    fn default() -> Self {
        Self {
            channels: [32, 64, 128],
        }
    }
}

impl ConvEncoderConfig {
    /// Length of the flattened feature vector for a 28x28 input.
    pub fn feature_dim(&self) -> usize {
        self.channels[2] * 7 * 7
    }

    /// Builds the encoder on `device` with fresh weights.
    pub fn init<B: Backend>(&self, device: &B::Device) -> ConvEncoder<B> {
        let [c0, c1, c2] = self.channels;
        let down = |i, o| {
            Conv2dConfig::new([i, o], [4, 4])
                .with_stride([2, 2])
                .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
                .init(device)
        };
        ConvEncoder {
            conv1: Conv2dConfig::new([1, c0], [3, 3])
                .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
                .init(device),
            conv2: down(c0, c1),
            conv3: down(c1, c2),
        }
    }
}

/// See [`ConvEncoderConfig`].
#[derive(Module, Debug)]
pub struct ConvEncoder<B: Backend> {
    pub conv1: Conv2d<B>,
    pub conv2: Conv2d<B>,
    pub conv3: Conv2d<B>,
}

impl<B: Backend> ConvEncoder<B> {
    /// `[batch, 1, 28, 28]` -> `[batch, c2 * 7 * 7]`.
    pub fn forward(&self, images: Tensor<B, 4>) -> Tensor<B, 2> {
        let x = relu(self.conv1.forward(images));
        let x = relu(self.conv2.forward(x));
        let x = relu(self.conv3.forward(x));
        x.flatten(1, 3)
    }
}
