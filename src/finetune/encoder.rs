//! Loading a pretrained encoder from a `frugal ssl-pretrain` run directory.

use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use burn::module::Module;
use burn::tensor::backend::Backend;

use crate::checkpoint::{record_from_bytes, Checkpoint};
use crate::config::{Method, PretrainConfig};
use crate::data::batch::images_tensor;
use crate::data::FashionMnist;
use crate::models::host_values;
use crate::models::{Encoder, EncoderConfig};
use crate::progress::{images_bar, log};

/// A pretrained encoder and what finetune needs to know of it.
pub struct PretrainedEncoder<B: Backend> {
    pub encoder: Encoder<B>,
    /// Length of the feature vector per image.
    pub feature_dim: usize,
    /// Pretraining method and encoder config, recorded in the finetune checkpoint so that a
    /// resume refuses an encoder run that changed under it.
    pub identity: serde_json::Value,
    /// Epochs the encoder was pretrained for, and whether its run finished.
    pub epochs: u64,
    pub finished: bool,
}

/// A pretraining run's config and checkpoint, checked to belong together.
struct EncoderRun {
    cfg: PretrainConfig,
    ckpt: Checkpoint,
    ckpt_path: std::path::PathBuf,
}

impl EncoderRun {
    fn open(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            bail!(
                "encoder run {} does not exist: pretrain one first (`frugal ssl-pretrain`), or \
                 pass --encoder checkpoints/<run>",
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
        let ckpt = Checkpoint::load(&ckpt_path)?;
        if ckpt.header.stage != crate::pretrain::STAGE {
            bail!(
                "{} holds a {} checkpoint, not a pretrained encoder: pass --encoder with a \
                 `frugal ssl-pretrain` run",
                ckpt_path.display(),
                ckpt.header.stage
            );
        }
        let cfg = PretrainConfig::from_file(&config_path)
            .with_context(|| format!("cannot read the encoder run {}", dir.display()))?;
        ckpt.expect(
            &ckpt_path,
            crate::pretrain::STAGE,
            cfg.method.name(),
            &cfg.architecture(),
        )?;
        Ok(Self {
            cfg,
            ckpt,
            ckpt_path,
        })
    }

    /// Method, encoder config and pretraining progress: what a finetune checkpoint records.
    fn identity(&self) -> Result<serde_json::Value> {
        let encoder = match self.cfg.method {
            // The VAE's encoder is always the conv one, recorded as its bare config.
            Method::Vae => serde_json::to_value(&self.cfg.vae.encoder)?,
            Method::Simclr => serde_json::to_value(&self.cfg.simclr.encoder)?,
        };
        Ok(serde_json::json!({
            "method": self.cfg.method.name(),
            "encoder": encoder,
            "pretrain_seed": self.ckpt.header.seed,
            "pretrain_step": self.ckpt.header.global_step,
        }))
    }
}

/// The identity ([`PretrainedEncoder::identity`]) of the encoder run in `dir`, without loading
/// its weights.
pub fn encoder_identity(dir: &Path) -> Result<serde_json::Value> {
    EncoderRun::open(dir)?.identity()
}

/// Loads the encoder of the pretraining run in `dir` (its `config.toml` and `checkpoint.bin`).
pub fn load_encoder<B: Backend>(dir: &Path, device: &B::Device) -> Result<PretrainedEncoder<B>> {
    let run = EncoderRun::open(dir)?;
    let (cfg, ck, ckpt_path) = (&run.cfg, &run.ckpt, &run.ckpt_path);
    let blob = ck.blob(ckpt_path, "model")?;
    let cannot = || {
        format!(
            "{}: cannot load the {} model",
            ckpt_path.display(),
            cfg.method.name()
        )
    };
    let (encoder, feature_dim) = match cfg.method {
        Method::Vae => {
            let record = record_from_bytes::<B, _>(blob, device).with_context(cannot)?;
            let vae = cfg.vae.init::<B>(device).load_record(record);
            let config = EncoderConfig::Conv(cfg.vae.encoder.clone());
            (Encoder::Conv(vae.encoder), config.feature_dim())
        }
        Method::Simclr => {
            let record = record_from_bytes::<B, _>(blob, device).with_context(cannot)?;
            let model = cfg.simclr.init::<B>(device).load_record(record);
            (model.encoder, cfg.simclr.encoder.feature_dim())
        }
    };
    Ok(PretrainedEncoder {
        encoder,
        feature_dim,
        identity: run.identity()?,
        epochs: ck.header.epoch,
        finished: ck.header.finished,
    })
}

/// Encoder features of every image, `[n, feature_dim]` row-major, `batch_size` images per forward
/// pass, with a progress bar and a log line.
pub fn encode_all<B: Backend>(
    encoder: &Encoder<B>,
    images: &FashionMnist,
    batch_size: usize,
    what: &str,
    device: &B::Device,
) -> Result<Vec<f32>> {
    let n = images.len();
    let t0 = Instant::now();
    let bar = images_bar(n as u64, 0, what);
    let mut out = Vec::new();
    let idx: Vec<usize> = (0..n).collect();
    for chunk in idx.chunks(batch_size) {
        out.extend(host_values(
            encoder.forward(images_tensor::<B>(images, chunk, device)),
        )?);
        bar.inc(chunk.len() as u64);
    }
    bar.finish_and_clear();
    let secs = t0.elapsed().as_secs_f64();
    log(
        None,
        &format!(
            "{what}: {n} images encoded in {secs:.0} s ({:.0} img/s)",
            n as f64 / secs.max(1e-9)
        ),
    );
    Ok(out)
}
