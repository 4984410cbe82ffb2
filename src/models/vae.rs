//! A convolutional variational autoencoder for 28x28 grayscale images.

use burn::nn::conv::{Conv2d, Conv2dConfig, ConvTranspose2d, ConvTranspose2dConfig};
use burn::nn::{Linear, LinearConfig, PaddingConfig2d};
use burn::prelude::*;
use burn::tensor::activation::{relu, softplus};
use serde::{Deserialize, Serialize};

use super::{ConvEncoder, ConvEncoderConfig};
use crate::kernels::{conv2d, conv_transpose2d_relu};

/// The VAE: [`ConvEncoder`], linear heads to the mean and log-variance of a `latent_dim`-dimensional
/// Gaussian, and a decoder that mirrors the encoder (linear, two 4x4 stride-2 transposed convs,
/// a 3x3 conv to one channel of logits).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct VaeConfig {
    pub encoder: ConvEncoderConfig,
    /// Size of the latent code (the embedding the projector shows).
    pub latent_dim: usize,
}

impl Default for VaeConfig {
    fn default() -> Self {
        Self {
            encoder: ConvEncoderConfig::default(),
            latent_dim: 32,
        }
    }
}

impl VaeConfig {
    /// Builds the VAE on `device` with fresh weights.
    pub fn init<B: Backend>(&self, device: &B::Device) -> Vae<B> {
        let [c0, c1, c2] = self.encoder.channels;
        let features = self.encoder.feature_dim();
        let up = |i, o| {
            ConvTranspose2dConfig::new([i, o], [4, 4])
                .with_stride([2, 2])
                .with_padding([1, 1])
                .init(device)
        };
        Vae {
            encoder: self.encoder.init(device),
            mu: LinearConfig::new(features, self.latent_dim).init(device),
            logvar: LinearConfig::new(features, self.latent_dim).init(device),
            decoder_in: LinearConfig::new(self.latent_dim, features).init(device),
            deconv1: up(c2, c1),
            deconv2: up(c1, c0),
            decoder_out: Conv2dConfig::new([c0, 1], [3, 3])
                .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
                .init(device),
            top_channels: c2,
        }
    }
}

/// See [`VaeConfig`].
#[derive(Module, Debug)]
pub struct Vae<B: Backend> {
    pub encoder: ConvEncoder<B>,
    pub mu: Linear<B>,
    pub logvar: Linear<B>,
    pub decoder_in: Linear<B>,
    pub deconv1: ConvTranspose2d<B>,
    pub deconv2: ConvTranspose2d<B>,
    pub decoder_out: Conv2d<B>,
    top_channels: usize,
}

/// What one forward pass gives.
pub struct VaeOutput<B: Backend> {
    /// Pixel logits, `[batch, 1, 28, 28]` (sigmoid gives the reconstruction).
    pub logits: Tensor<B, 4>,
    /// `[batch, latent]`.
    pub mu: Tensor<B, 2>,
    /// `[batch, latent]`.
    pub logvar: Tensor<B, 2>,
}

impl<B: Backend> Vae<B> {
    /// The latent mean: `[batch, 1, 28, 28]` -> `[batch, latent]`. This is the embedding.
    pub fn embed(&self, images: Tensor<B, 4>) -> Tensor<B, 2> {
        self.mu.forward(self.encoder.forward(images))
    }

    /// Decodes latent codes `[batch, latent]` to logits `[batch, 1, 28, 28]`.
    pub fn decode(&self, z: Tensor<B, 2>) -> Tensor<B, 4> {
        let [batch, _] = z.dims();
        let x = relu(self.decoder_in.forward(z)).reshape([batch, self.top_channels, 7, 7]);
        let x = conv_transpose2d_relu(&self.deconv1, x);
        let x = conv_transpose2d_relu(&self.deconv2, x);
        conv2d(&self.decoder_out, x)
    }

    /// Encodes, samples `z = mu + exp(logvar / 2) * noise` and decodes. `noise` is standard normal
    /// `[batch, latent]`, drawn by the caller so that runs are reproducible on every backend.
    pub fn forward(&self, images: Tensor<B, 4>, noise: Tensor<B, 2>) -> VaeOutput<B> {
        let h = self.encoder.forward(images);
        let mu = self.mu.forward(h.clone());
        let logvar = self.logvar.forward(h);
        let z = mu.clone() + (logvar.clone() * 0.5).exp() * noise;
        VaeOutput {
            logits: self.decode(z),
            mu,
            logvar,
        }
    }
}

/// Per-image losses: `(reconstruction, kl)`, each a scalar tensor averaged over the batch.
/// Reconstruction is binary cross-entropy with logits summed over pixels; KL is the divergence of
/// `N(mu, exp(logvar))` from `N(0, 1)` summed over latent dimensions.
pub fn vae_losses<B: Backend>(
    out: &VaeOutput<B>,
    images: Tensor<B, 4>,
) -> (Tensor<B, 1>, Tensor<B, 1>) {
    let [batch, ..] = images.dims();
    // BCE with logits, stable form: softplus(x) - x * t.
    let bce = softplus(out.logits.clone(), 1.0) - out.logits.clone() * images;
    let recon = bce.sum() / batch as f64;
    let kl = (out.mu.clone().powi_scalar(2) + out.logvar.clone().exp() - out.logvar.clone() - 1.0)
        .sum()
        * (0.5 / batch as f64);
    (recon, kl)
}
