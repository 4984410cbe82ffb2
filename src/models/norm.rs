//! Batch normalisation of image batches, computed in the layout that burn's `flex` CPU backend
//! runs fast.
//!
//! burn's `BatchNorm::forward` broadcasts per-channel values of shape `[1, c, 1, 1]` over
//! `[n, c, h, w]` and reduces after `swap_dims(0, 1)`; on `flex` both go through its scalar
//! strided iterator, which took about 60% of a ResNet SimCLR step (34 images/s). Here the batch is
//! seen as `n * c` rows of `h * w` values: every reduction runs along rows and every broadcast is
//! one scalar per row, the two patterns `flex` runs with SIMD. The arithmetic, the biased variance
//! and the running statistics are burn's, so the layer, its parameters and checkpoints stay
//! burn's `BatchNorm`.

use burn::nn::BatchNorm;
use burn::prelude::*;

/// `bn.forward(x)` for images, `[n, c, h, w] -> [n, c, h, w]`: batch statistics (and an update of
/// the running ones) when `B` records gradients, the running statistics otherwise, as burn does.
pub fn batch_norm_2d<B: Backend>(bn: &BatchNorm<B>, x: Tensor<B, 4>) -> Tensor<B, 4> {
    let [n, c, h, w] = x.dims();
    let rows = x.reshape([n * c, h * w]);
    // One value per channel, `[1, c]`, repeated for every image: `[n * c, 1]`.
    let per_row = |t: Tensor<B, 2>| t.expand([n, c]).reshape([n * c, 1]);
    let (centered, var) = if B::ad_enabled(&rows.device()) {
        let mean = rows.clone().mean_dim(1).reshape([n, c]).mean_dim(0);
        let centered = rows - per_row(mean.clone());
        let var = centered
            .clone()
            .square()
            .mean_dim(1)
            .reshape([n, c])
            .mean_dim(0);
        let m = bn.momentum;
        let update = |state: &burn::module::RunningState<Tensor<B, 1>>, batch: Tensor<B, 2>| {
            let running = state.value_sync().to_device(&batch.device());
            state.update(
                running
                    .mul_scalar(1.0 - m)
                    .add(batch.detach().mul_scalar(m).reshape([c]))
                    .detach(),
            );
        };
        update(&bn.running_mean, mean);
        update(&bn.running_var, var.clone());
        (centered, var)
    } else {
        let device = rows.device();
        let mean = bn.running_mean.value().to_device(&device).reshape([1, c]);
        let var = bn.running_var.value().to_device(&device).reshape([1, c]);
        (rows - per_row(mean), var)
    };
    let scale = bn.gamma.val().reshape([1, c]) / var.add_scalar(bn.epsilon).sqrt();
    let y = centered * per_row(scale) + per_row(bn.beta.val().reshape([1, c]));
    y.reshape([n, c, h, w])
}

/// The mean of each channel, `[n, c, h, w] -> [n, c]` (global average pooling), as a reduction
/// along rows.
pub fn channel_means<B: Backend>(x: Tensor<B, 4>) -> Tensor<B, 2> {
    let [n, c, h, w] = x.dims();
    x.reshape([n, c, h * w]).mean_dim(2).reshape([n, c])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::host_values;
    use burn::backend::{Autodiff, Flex};
    use burn::module::AutodiffModule;
    use burn::module::{Param, RunningState};
    use burn::nn::BatchNormConfig;
    use burn::tensor::Distribution;

    type Ad = Autodiff<Flex>;

    fn close(a: &[f32], b: &[f32], tol: f32) {
        assert_eq!(a.len(), b.len());
        let scale = b.iter().fold(1f32, |m, v| m.max(v.abs()));
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            assert!((x - y).abs() <= tol * scale, "element {i}: {x} against {y}");
        }
    }

    /// A layer with non-trivial gamma, beta and running statistics, its own (clones of a layer
    /// share their running statistics).
    fn layer(c: usize) -> BatchNorm<Ad> {
        let device = Default::default();
        let values = |k: f32, lo: f32, hi: f32| {
            let v: Vec<f32> = (0..c)
                .map(|i| lo + (hi - lo) * ((i as f32 * k).sin() * 0.5 + 0.5))
                .collect();
            Tensor::<Ad, 1>::from_floats(v.as_slice(), &device)
        };
        let mut bn = BatchNormConfig::new(c)
            .with_momentum(0.3)
            .init::<Ad>(&device);
        bn.gamma = Param::from_tensor(values(1.3, 0.5, 2.0));
        bn.beta = Param::from_tensor(values(2.1, -1.0, 1.0));
        bn.running_mean = RunningState::new(values(0.7, -0.5, 0.5));
        bn.running_var = RunningState::new(values(1.9, 0.5, 1.5));
        bn
    }

    #[test]
    fn training_forward_gradients_and_running_statistics_match_burn() {
        let device = Default::default();
        let c = 5;
        let (ours, burns) = (layer(c), layer(c));
        let mean_before = host_values(ours.running_mean.value_sync()).unwrap();
        let x = Tensor::<Ad, 4>::random([3, c, 4, 6], Distribution::Normal(0.7, 2.0), &device);
        let weights = Tensor::<Ad, 4>::random([3, c, 4, 6], Distribution::Default, &device);
        let run = |bn: &BatchNorm<Ad>, ours: bool| {
            let x = x.clone().require_grad();
            let y = if ours {
                batch_norm_2d(bn, x.clone())
            } else {
                bn.forward(x.clone())
            };
            let grads = (y.clone() * weights.clone()).sum().backward();
            let values = |t: Tensor<Ad, 1>| host_values(t).unwrap();
            (
                host_values(y).unwrap(),
                host_values(x.grad(&grads).unwrap()).unwrap(),
                host_values(bn.gamma.grad(&grads).unwrap()).unwrap(),
                host_values(bn.beta.grad(&grads).unwrap()).unwrap(),
                values(bn.running_mean.value_sync()),
                values(bn.running_var.value_sync()),
            )
        };
        let (a, b) = (run(&ours, true), run(&burns, false));
        close(&a.0, &b.0, 1e-5);
        close(&a.1, &b.1, 1e-4);
        close(&a.2, &b.2, 1e-4);
        close(&a.3, &b.3, 1e-5);
        close(&a.4, &b.4, 1e-6);
        close(&a.5, &b.5, 1e-6);
        // The running statistics moved toward the batch's.
        assert_ne!(a.4, mean_before);
    }

    #[test]
    fn inference_uses_the_running_statistics_as_burn_does() {
        let device = Default::default();
        let bn = layer(4).valid();
        let x = Tensor::<Flex, 4>::random([2, 4, 3, 3], Distribution::Normal(0.0, 3.0), &device);
        let mean_before = host_values(bn.running_mean.value()).unwrap();
        close(
            &host_values(batch_norm_2d(&bn, x.clone())).unwrap(),
            &host_values(bn.forward(x)).unwrap(),
            1e-5,
        );
        assert_eq!(host_values(bn.running_mean.value()).unwrap(), mean_before);
    }

    #[test]
    fn channel_means_pool_each_channel() {
        let device = Default::default();
        let x = Tensor::<Flex, 4>::random([2, 3, 4, 5], Distribution::Default, &device);
        close(
            &host_values(channel_means(x.clone())).unwrap(),
            &host_values(x.mean_dim(3).mean_dim(2).reshape([2, 3])).unwrap(),
            1e-6,
        );
    }
}
