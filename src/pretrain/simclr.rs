//! SimCLR pretraining: two augmented views per image (prepared one batch ahead on another
//! thread), the NT-Xent loss on the projections, label-free monitors of the embedding, a grid of
//! view pairs and a test k-NN dashboard, on the shared loop of [`super::driver`].

use std::sync::Arc;

use anyhow::{bail, Result};
use burn::module::AutodiffModule;
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;

use super::contrastive::{nt_xent, pair_stat_tensors};
use super::driver::{self, Metric, Objective, PlannedBatch};
use super::knn::knn_accuracy;
use super::{PretrainRun, PretrainSummary};
use crate::data::augment::{view_pairs, Prefetcher};
use crate::data::batch::{fixed_subsample, images_tensor};
use crate::data::{FashionMnist, Split, IMAGE_SIDE};
use crate::device::BackendJob;
use crate::models::{Simclr, SimclrConfig};
use crate::tensorboard::{image_grid, EventWriter};

/// Pretrains a [`Simclr`] model; see [`super::pretrain`].
pub struct SimclrPretrain(pub PretrainRun);

impl BackendJob for SimclrPretrain {
    type Output = PretrainSummary;

    fn run<B: AutodiffBackend>(self, device: B::Device) -> Result<PretrainSummary> {
        let cfg = &self.0.cfg;
        let train = Arc::new(FashionMnist::load_images(
            &cfg.data.dir,
            Split::Train,
            cfg.data.limit,
        )?);
        let knn = KnnMonitor::load(cfg)?;
        let objective = SimclrObjective::<B>::new(cfg, train.clone(), knn, &device);
        driver::train(self.0, train, objective, device)
    }
}

/// The test images of the k-NN dashboard, split once into the labelled bank and the scored rest.
pub(crate) struct KnnMonitor {
    test: FashionMnist,
    bank: Vec<usize>,
    query: Vec<usize>,
    labels: Vec<u8>,
    k: usize,
}

impl KnnMonitor {
    fn load(cfg: &crate::config::PretrainConfig) -> Result<Option<Self>> {
        let r = &cfg.report;
        if r.knn_fit_images == 0 {
            return Ok(None);
        }
        let test = FashionMnist::load_images(&cfg.data.dir, Split::Test, None)?;
        let labels = FashionMnist::load_labels(&cfg.data.dir, Split::Test, &test)?;
        if r.knn_fit_images >= test.len() {
            bail!(
                "report.knn_fit_images ({}) must be less than the {} test images (the rest are \
                 scored)",
                r.knn_fit_images,
                test.len()
            );
        }
        // A fixed split, the same for every run and epoch, so curves are comparable.
        let order = fixed_subsample(test.len(), test.len(), 0);
        let (bank, query) = order.split_at(r.knn_fit_images);
        Ok(Some(Self {
            bank: bank.to_vec(),
            query: query.to_vec(),
            labels,
            k: r.knn_k,
            test,
        }))
    }

    /// k-NN test accuracy of `model`'s encoder features.
    fn accuracy<B: Backend>(&self, model: &Simclr<B>, device: &B::Device) -> Result<f64> {
        let features = |idx: &[usize]| -> Tensor<B, 2> {
            let parts: Vec<Tensor<B, 2>> = idx
                .chunks(1000)
                .map(|c| model.embed(images_tensor::<B>(&self.test, c, device)))
                .collect();
            Tensor::cat(parts, 0)
        };
        let labels = |idx: &[usize]| -> Vec<u8> { idx.iter().map(|&i| self.labels[i]).collect() };
        knn_accuracy(
            features(&self.bank),
            &labels(&self.bank),
            features(&self.query),
            &labels(&self.query),
            self.k,
        )
    }
}

/// SimCLR's loss and reports.
pub(crate) struct SimclrObjective<B: AutodiffBackend> {
    cfg: SimclrConfig,
    seed: u64,
    /// Training images whose view pairs are shown.
    pair_idx: Vec<usize>,
    train: Arc<FashionMnist>,
    /// The views of the planned batches, prepared ahead.
    views: Option<Prefetcher>,
    /// Since the last report: seconds the steps waited for views, and the wall-clock start.
    view_wait: f64,
    since: std::time::Instant,
    knn: Option<KnnMonitor>,
    device: B::Device,
}

impl<B: AutodiffBackend> SimclrObjective<B> {
    /// The objective of `cfg` on the images `train`, with the k-NN dashboard when `knn` is given
    /// (`frugal bench speed` runs without it).
    pub(crate) fn new(
        cfg: &crate::config::PretrainConfig,
        train: Arc<FashionMnist>,
        knn: Option<KnnMonitor>,
        device: &B::Device,
    ) -> Self {
        Self {
            cfg: cfg.simclr.clone(),
            seed: cfg.train.seed,
            pair_idx: fixed_subsample(train.len(), cfg.report.view_pair_images, cfg.train.seed),
            train,
            views: None,
            view_wait: 0.0,
            since: std::time::Instant::now(),
            knn,
            device: device.clone(),
        }
    }
}

impl<B: AutodiffBackend> Objective<B> for SimclrObjective<B> {
    type Model = Simclr<B>;
    const NAME: &'static str = "simclr";
    const METRICS: &'static [Metric] = &[
        Metric {
            key: "loss",
            tag: "loss/nt_xent",
        },
        Metric {
            key: "alignment",
            tag: "monitor/alignment",
        },
        Metric {
            key: "uniformity",
            tag: "monitor/uniformity",
        },
        Metric {
            key: "positive_top1",
            tag: "monitor/positive_top1",
        },
    ];

    fn init(&self, device: &B::Device) -> Simclr<B> {
        self.cfg.init(device)
    }

    fn plan(&mut self, batches: Vec<PlannedBatch>) {
        // The old thread (if any) stops when dropped.
        self.views = None;
        self.views = Some(Prefetcher::start(
            self.train.clone(),
            self.cfg.augment.clone(),
            self.seed,
            batches,
        ));
    }

    fn step(
        &mut self,
        model: &Simclr<B>,
        step: u64,
        indices: &[usize],
    ) -> Result<Vec<Tensor<B, 1>>> {
        let t0 = std::time::Instant::now();
        let views = self.views.as_mut().and_then(|v| v.next());
        self.view_wait += t0.elapsed().as_secs_f64();
        let Some((planned, views)) = views else {
            bail!("internal error: no views prepared for step {step}");
        };
        if planned != step {
            bail!("internal error: views of step {planned} arrived for step {step}");
        }
        let n = indices.len();
        // Both views in one pass: batch-norm statistics over all 2n views, as in SimCLR.
        let x = Tensor::<B, 4>::from_data(
            TensorData::new(views, [2 * n, 1, IMAGE_SIDE, IMAGE_SIDE]),
            &self.device,
        );
        let z = model.project(model.embed(x));
        let (z1, z2) = (z.clone().narrow(0, 0, n), z.narrow(0, n, n));
        let loss = nt_xent(z1.clone(), z2.clone(), self.cfg.temperature);
        let [alignment, uniformity, top1] = pair_stat_tensors(z1.detach(), z2.detach());
        Ok(vec![loss, alignment, uniformity, top1])
    }

    fn report(
        &mut self,
        tb: &mut EventWriter,
        model: &Simclr<B>,
        step: u64,
    ) -> Result<Vec<(String, f64)>> {
        if !self.pair_idx.is_empty() {
            // Rows of up to eight images: view A above view B.
            let (a, b) = view_pairs(
                &self.train,
                &self.pair_idx,
                &self.cfg.augment,
                self.seed,
                step,
            );
            let px = IMAGE_SIDE * IMAGE_SIDE;
            let cols = self.pair_idx.len().min(8);
            let mut tiles: Vec<&[f32]> = Vec::new();
            for (ra, rb) in a.chunks(cols * px).zip(b.chunks(cols * px)) {
                let blank = cols - ra.len() / px;
                tiles.extend(ra.chunks(px));
                tiles.extend(std::iter::repeat_n(&[][..], blank));
                tiles.extend(rb.chunks(px));
                tiles.extend(std::iter::repeat_n(&[][..], blank));
            }
            let grid = image_grid(&tiles, IMAGE_SIDE, IMAGE_SIDE, cols, 2);
            tb.add_image("views/pairs", &grid, step)?;
        }
        let mut dashboard = Vec::new();
        if step > 0 {
            // How much of the wall time training waited for augmented views: near 0 when the
            // thread preparing them keeps ahead.
            let wall = self.since.elapsed().as_secs_f64();
            dashboard.push((
                "train/view_wait_share".to_string(),
                self.view_wait / wall.max(1e-9),
            ));
        }
        (self.view_wait, self.since) = (0.0, std::time::Instant::now());
        if let Some(knn) = &self.knn {
            let accuracy = knn.accuracy(&model.valid(), &self.device)?;
            dashboard.push(("monitor/knn_test_accuracy".to_string(), accuracy));
        }
        Ok(dashboard)
    }

    fn embed(
        &self,
        model: &Simclr<B::InnerBackend>,
        images: Tensor<B::InnerBackend, 4>,
    ) -> Tensor<B::InnerBackend, 2> {
        model.project(model.embed(images))
    }

    fn embedding(&self) -> (&'static str, usize) {
        ("simclr_projection", self.cfg.projection_dim)
    }
}
