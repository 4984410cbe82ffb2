//! Loading a pretrained encoder from a `frugal ssl-pretrain` run directory.

use std::path::Path;

use anyhow::{bail, Context, Result};
use burn::module::Module;
use burn::tensor::backend::Backend;

use crate::checkpoint::{record_from_bytes, Checkpoint};
use crate::config::{Method, PretrainConfig};
use crate::models::ConvEncoder;

/// A pretrained encoder and what finetune needs to know of it.
pub struct PretrainedEncoder<B: Backend> {
    pub encoder: ConvEncoder<B>,
    /// Length of the feature vector per image.
    pub feature_dim: usize,
    /// Pretraining method and encoder config, recorded in the finetune checkpoint so that a
    /// resume refuses an encoder run that changed under it.
    pub identity: serde_json::Value,
    /// Epochs the encoder was pretrained for, and whether its run finished.
    pub epochs: u64,
    pub finished: bool,
}

/// Loads the encoder of the pretraining run in `dir` (its `config.toml` and `checkpoint.bin`).
pub fn load_encoder<B: Backend>(dir: &Path, device: &B::Device) -> Result<PretrainedEncoder<B>> {
    if !dir.is_dir() {
        bail!(
            "encoder run {} does not exist: pretrain one first (`frugal ssl-pretrain`), or pass \
             --encoder checkpoints/<run>",
            dir.display()
        );
    }
    let config_path = dir.join("config.toml");
    let ckpt_path = dir.join("checkpoint.bin");
    if !config_path.exists() || !ckpt_path.exists() {
        bail!(
            "{} is not a pretraining run (it has no config.toml and checkpoint.bin): pass \
             --encoder checkpoints/<run> of a `frugal ssl-pretrain` run",
            dir.display()
        );
    }
    let ck = Checkpoint::load(&ckpt_path)?;
    if ck.header.stage != crate::pretrain::STAGE {
        bail!(
            "{} holds a {} checkpoint, not a pretrained encoder: pass --encoder with a \
             `frugal ssl-pretrain` run",
            ckpt_path.display(),
            ck.header.stage
        );
    }
    let cfg = PretrainConfig::from_file(&config_path)
        .with_context(|| format!("cannot read the encoder run {}", dir.display()))?;
    ck.expect(
        &ckpt_path,
        crate::pretrain::STAGE,
        cfg.method.name(),
        &cfg.architecture(),
    )?;
    let (encoder, feature_dim, encoder_cfg) = match cfg.method {
        Method::Vae => {
            let record = record_from_bytes::<B, _>(ck.blob(&ckpt_path, "model")?, device)
                .with_context(|| format!("{}: cannot load the VAE", ckpt_path.display()))?;
            let vae = cfg.vae.init::<B>(device).load_record(record);
            (
                vae.encoder,
                cfg.vae.encoder.feature_dim(),
                serde_json::to_value(&cfg.vae.encoder)?,
            )
        }
    };
    Ok(PretrainedEncoder {
        encoder,
        feature_dim,
        identity: serde_json::json!({
            "method": cfg.method.name(),
            "encoder": encoder_cfg,
            "pretrain_seed": ck.header.seed,
            "pretrain_step": ck.header.global_step,
        }),
        epochs: ck.header.epoch,
        finished: ck.header.finished,
    })
}
