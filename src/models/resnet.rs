//! A small ResNet for 28x28 images: a stride-1 3x3 stem (no max-pool, the images are tiny), three
//! stages of basic residual blocks at 28x28, 14x14 and 7x7, and global average pooling.

use super::norm::{batch_norm_2d, channel_means};
use crate::kernels::conv2d;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{BatchNorm, BatchNormConfig, PaddingConfig2d};
use burn::prelude::*;
use burn::tensor::activation::relu;
use serde::{Deserialize, Serialize};

/// `stem: conv 3x3 (1 -> w0) + BN + ReLU`, then stage `s` = `blocks[s]` basic blocks of width
/// `widths[s]`, the first block of stages 2 and 3 with stride 2. Features: the `widths[2]` channel
/// means of the last stage.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ResNetEncoderConfig {
    /// Channels of the three stages (the stem has `widths[0]`).
    pub widths: [usize; 3],
    /// Basic blocks per stage.
    pub blocks: [usize; 3],
}

impl Default for ResNetEncoderConfig {
    fn default() -> Self {
        Self {
            widths: [32, 64, 128],
            blocks: [1, 1, 1],
        }
    }
}

fn conv3x3<B: Backend>(i: usize, o: usize, stride: usize, device: &B::Device) -> Conv2d<B> {
    Conv2dConfig::new([i, o], [3, 3])
        .with_stride([stride, stride])
        .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
        .with_bias(false)
        .init(device)
}

impl ResNetEncoderConfig {
    /// Length of the feature vector (the last stage's width).
    pub fn feature_dim(&self) -> usize {
        self.widths[2]
    }

    /// Builds the encoder on `device` with fresh weights.
    pub fn init<B: Backend>(&self, device: &B::Device) -> ResNetEncoder<B> {
        // Stage `s` starts from the previous stage's width; its first block strides by 2, except in
        // stage 1 (28x28 all along).
        let stage = |s: usize| -> Vec<BasicBlock<B>> {
            let (input, width) = (self.widths[s.saturating_sub(1)], self.widths[s]);
            let stride = if s == 0 { 1 } else { 2 };
            (0..self.blocks[s])
                .map(|b| match b {
                    0 => BasicBlock::new(input, width, stride, device),
                    _ => BasicBlock::new(width, width, 1, device),
                })
                .collect()
        };
        ResNetEncoder {
            stem: conv3x3(1, self.widths[0], 1, device),
            stem_bn: BatchNormConfig::new(self.widths[0]).init(device),
            stage1: stage(0),
            stage2: stage(1),
            stage3: stage(2),
        }
    }
}

/// `conv 3x3 (stride) + BN + ReLU + conv 3x3 + BN`, plus the input (through a 1x1 conv + BN where
/// the shape changes), then ReLU.
#[derive(Module, Debug)]
pub struct BasicBlock<B: Backend> {
    pub conv1: Conv2d<B>,
    pub bn1: BatchNorm<B>,
    pub conv2: Conv2d<B>,
    pub bn2: BatchNorm<B>,
    pub shortcut: Option<Shortcut<B>>,
}

/// The 1x1 conv + BN that matches the input to a block's output shape.
#[derive(Module, Debug)]
pub struct Shortcut<B: Backend> {
    pub conv: Conv2d<B>,
    pub bn: BatchNorm<B>,
}

impl<B: Backend> BasicBlock<B> {
    fn new(input: usize, output: usize, stride: usize, device: &B::Device) -> Self {
        let shortcut = (stride != 1 || input != output).then(|| Shortcut {
            conv: Conv2dConfig::new([input, output], [1, 1])
                .with_stride([stride, stride])
                .with_bias(false)
                .init(device),
            bn: BatchNormConfig::new(output).init(device),
        });
        Self {
            conv1: conv3x3(input, output, stride, device),
            bn1: BatchNormConfig::new(output).init(device),
            conv2: conv3x3(output, output, 1, device),
            bn2: BatchNormConfig::new(output).init(device),
            shortcut,
        }
    }

    /// `[batch, input, h, w]` -> `[batch, output, h / stride, w / stride]`.
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let y = relu(batch_norm_2d(&self.bn1, conv2d(&self.conv1, x.clone())));
        let y = batch_norm_2d(&self.bn2, conv2d(&self.conv2, y));
        let skip = match &self.shortcut {
            Some(s) => batch_norm_2d(&s.bn, conv2d(&s.conv, x)),
            None => x,
        };
        relu(y + skip)
    }
}

/// See [`ResNetEncoderConfig`].
#[derive(Module, Debug)]
pub struct ResNetEncoder<B: Backend> {
    pub stem: Conv2d<B>,
    pub stem_bn: BatchNorm<B>,
    pub stage1: Vec<BasicBlock<B>>,
    pub stage2: Vec<BasicBlock<B>>,
    pub stage3: Vec<BasicBlock<B>>,
}

impl<B: Backend> ResNetEncoder<B> {
    /// `[batch, 1, 28, 28]` -> `[batch, widths[2]]`.
    pub fn forward(&self, images: Tensor<B, 4>) -> Tensor<B, 2> {
        let mut x = relu(batch_norm_2d(&self.stem_bn, conv2d(&self.stem, images)));
        for block in self.stage1.iter().chain(&self.stage2).chain(&self.stage3) {
            x = block.forward(x);
        }
        channel_means(x)
    }

    /// The same encoder with everything but the last stage frozen.
    pub fn freeze_early(mut self) -> Self {
        self.stem = self.stem.no_grad();
        self.stem_bn = self.stem_bn.no_grad();
        self.stage1 = self.stage1.no_grad();
        self.stage2 = self.stage2.no_grad();
        self
    }
}
