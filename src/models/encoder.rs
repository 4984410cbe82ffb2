//! The encoders shared by the pretraining methods and the classifier: the plain conv encoder (the
//! VAE's), and [`Encoder`], any of them (SimCLR and fine-tuning).

use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::PaddingConfig2d;
use burn::prelude::*;
use serde::{Deserialize, Serialize};

use super::resnet::{ResNetEncoder, ResNetEncoderConfig};
use crate::kernels::conv2d_relu;

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
        let x = conv2d_relu(&self.conv1, images);
        let x = conv2d_relu(&self.conv2, x);
        let x = conv2d_relu(&self.conv3, x);
        x.flatten(1, 3)
    }
}

/// The encoder architecture of a pretraining run (`[simclr.encoder]` in a pipeline file, with
/// `kind = "conv"` or `kind = "resnet"`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum EncoderConfig {
    /// [`ConvEncoderConfig`]: three plain conv layers, flattened `c2 x 7 x 7` features.
    Conv(ConvEncoderConfig),
    /// [`ResNetEncoderConfig`]: a small ResNet, globally pooled features.
    Resnet(ResNetEncoderConfig),
}

impl Default for EncoderConfig {
    fn default() -> Self {
        Self::Conv(ConvEncoderConfig::default())
    }
}

impl EncoderConfig {
    /// Length of the feature vector per image.
    pub fn feature_dim(&self) -> usize {
        match self {
            Self::Conv(c) => c.feature_dim(),
            Self::Resnet(c) => c.feature_dim(),
        }
    }

    /// Refuses zero widths or an empty network.
    pub fn validate(&self, key: &str) -> anyhow::Result<()> {
        let ok = match self {
            Self::Conv(c) => !c.channels.contains(&0),
            Self::Resnet(c) => !c.widths.contains(&0) && !c.blocks.contains(&0),
        };
        if !ok {
            anyhow::bail!("{key}: every width and block count must be at least 1");
        }
        Ok(())
    }

    /// Builds the encoder on `device` with fresh weights.
    pub fn init<B: Backend>(&self, device: &B::Device) -> Encoder<B> {
        match self {
            Self::Conv(c) => Encoder::Conv(c.init(device)),
            Self::Resnet(c) => Encoder::Resnet(c.init(device)),
        }
    }
}

/// Any of the encoders: what fine-tuning and SimCLR work with. See [`EncoderConfig`].
// One encoder per model, a few hundred bytes of handles either way: boxing buys nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Module, Debug)]
pub enum Encoder<B: Backend> {
    Conv(ConvEncoder<B>),
    Resnet(ResNetEncoder<B>),
}

impl<B: Backend> Encoder<B> {
    /// `[batch, 1, 28, 28]` -> `[batch, feature_dim]`.
    pub fn forward(&self, images: Tensor<B, 4>) -> Tensor<B, 2> {
        match self {
            Self::Conv(e) => e.forward(images),
            Self::Resnet(e) => e.forward(images),
        }
    }

    /// The same encoder with all but its last block frozen (`finetune --freeze partial`).
    pub fn freeze_early(self) -> Self {
        match self {
            Self::Conv(mut e) => {
                e.conv1 = e.conv1.no_grad();
                e.conv2 = e.conv2.no_grad();
                Self::Conv(e)
            }
            Self::Resnet(e) => Self::Resnet(e.freeze_early()),
        }
    }
}
