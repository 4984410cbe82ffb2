//! Faster CPU kernels for the hot operations, as an extension of burn's `flex` backend.
//!
//! Profiling the VAE step on burn 0.21 `flex` put about 90% of the time in convolutions and
//! transposed convolutions (their weight gradients go through generic permute-and-copy code).
//! [`conv2d`] and [`conv_transpose2d`] run a layer with the kernels of [`conv`] when the backend
//! is `Flex` (inference) or `Autodiff<Flex>` (training, through a custom autodiff operation), and
//! with burn's own op on any other backend (CUDA) or configuration (dilation, groups, asymmetric
//! padding, non-f32). The models call these instead of `layer.forward`; the layers, their
//! parameters and checkpoints stay burn's.
//!
//! The backend is recognised at run time by type (`Any`), so model code stays generic over
//! `B: Backend` and needs no extra trait bound.

pub mod conv;
mod rows;

use std::any::Any;

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::flex::FlexTensor;
use burn::backend::{Autodiff, Flex};
use burn::nn::conv::{Conv2d, ConvTranspose2d};
use burn::nn::PaddingConfig2d;
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Shape, Tensor, TensorData, TensorMetadata, TensorPrimitive};

use burn::tensor::activation::relu;
use conv::{
    channel_sums, conv_backward_data, conv_backward_weight, conv_forward, prefers_swapped,
    relu_backward, swap_weight, ConvGeometry, Epilogue,
};

/// The training backend the kernels serve.
type FlexAd = Autodiff<Flex>;

thread_local! {
    /// Off inside [`with_burn_ops`].
    static ENABLED: std::cell::Cell<bool> = const { std::cell::Cell::new(true) };
}

/// Runs `f` with burn's own convolution ops instead of these kernels (on this thread): the
/// reference that tests compare against, and the "before" of `frugal bench speed --burn-conv`.
pub fn with_burn_ops<R>(f: impl FnOnce() -> R) -> R {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            ENABLED.with(|e| e.set(self.0));
        }
    }
    let _restore = Restore(ENABLED.with(|e| e.replace(false)));
    f()
}

/// `layer.forward(x)`: `[n, c, h, w] -> [n, o, oh, ow]`.
pub fn conv2d<B: Backend>(layer: &Conv2d<B>, x: Tensor<B, 4>) -> Tensor<B, 4> {
    conv2d_then(layer, x, false)
}

/// `relu(layer.forward(x))`, with the ReLU fused into the kernels (no pass of its own over the
/// output, forward or backward): `[n, c, h, w] -> [n, o, oh, ow]`.
pub fn conv2d_relu<B: Backend>(layer: &Conv2d<B>, x: Tensor<B, 4>) -> Tensor<B, 4> {
    conv2d_then(layer, x, true)
}

/// `relu(layer.forward(x))` of a transposed convolution, fused as in [`conv2d_relu`].
pub fn conv_transpose2d_relu<B: Backend>(
    layer: &ConvTranspose2d<B>,
    x: Tensor<B, 4>,
) -> Tensor<B, 4> {
    conv_transpose2d_then(layer, x, true)
}

/// `layer.forward(x)` of a transposed convolution: `[n, cin, h, w] -> [n, cout, oh, ow]`.
pub fn conv_transpose2d<B: Backend>(layer: &ConvTranspose2d<B>, x: Tensor<B, 4>) -> Tensor<B, 4> {
    conv_transpose2d_then(layer, x, false)
}

/// burn's own layer, then the activation.
fn burn_layer<B: Backend>(y: Tensor<B, 4>, then_relu: bool) -> Tensor<B, 4> {
    if then_relu {
        relu(y)
    } else {
        y
    }
}

fn conv2d_then<B: Backend>(layer: &Conv2d<B>, x: Tensor<B, 4>, then_relu: bool) -> Tensor<B, 4> {
    if !ENABLED.with(|e| e.get()) {
        return burn_layer(layer.forward(x), then_relu);
    }
    let [_, c, h, w] = x.dims();
    // Symmetric padding only; `Same` (possibly asymmetric) goes to burn's op.
    let padding = match layer.padding {
        PaddingConfig2d::Valid => Some([0, 0]),
        PaddingConfig2d::Explicit(top, left, bottom, right) if top == bottom && left == right => {
            Some([top, left])
        }
        _ => None,
    };
    let Some([top, left]) = padding else {
        return burn_layer(layer.forward(x), then_relu);
    };
    let supported = layer.dilation == [1, 1] && layer.groups == 1 && x.dtype() == DType::F32;
    let spec = Spec {
        transpose: false,
        g: ConvGeometry::new([c, h, w], layer.kernel_size, layer.stride, [top, left]),
        o: layer.weight.dims()[0],
        relu: then_relu,
    };
    let bias = layer.bias.as_ref().map(|b| b.val());
    match supported.then(|| run(x.clone(), layer.weight.val(), bias, &spec)) {
        Some(Some(y)) => y,
        _ => burn_layer(layer.forward(x), then_relu),
    }
}

fn conv_transpose2d_then<B: Backend>(
    layer: &ConvTranspose2d<B>,
    x: Tensor<B, 4>,
    then_relu: bool,
) -> Tensor<B, 4> {
    if !ENABLED.with(|e| e.get()) {
        return burn_layer(layer.forward(x), then_relu);
    }
    let [_, _, h, w] = x.dims();
    let [cin, cout, kh, kw] = layer.weight.dims();
    let (s, p, po) = (layer.stride, layer.padding, layer.padding_out);
    // Output size (n - 1) * s + k + padding_out - 2 * padding, when positive.
    let out = |n: usize, i: usize, k: usize| {
        ((n.max(1) - 1) * s[i] + k + po[i])
            .checked_sub(2 * p[i])
            .filter(|&o| o > 0)
    };
    let (Some(oh), Some(ow)) = (out(h, 0, kh), out(w, 1, kw)) else {
        return burn_layer(layer.forward(x), then_relu);
    };
    let supported = layer.dilation == [1, 1]
        && layer.groups == 1
        && po[0] < s[0]
        && po[1] < s[1]
        && x.dtype() == DType::F32;
    // The output is the "image" of the underlying convolution, and the input its outputs.
    let spec = Spec {
        transpose: true,
        g: ConvGeometry {
            c: cout,
            h: oh,
            w: ow,
            kh,
            kw,
            stride: s,
            padding: p,
            oh: h,
            ow: w,
        },
        o: cin,
        relu: then_relu,
    };
    let bias = layer.bias.as_ref().map(|b| b.val());
    match supported.then(|| run(x.clone(), layer.weight.val(), bias, &spec)) {
        Some(Some(y)) => y,
        _ => burn_layer(layer.forward(x), then_relu),
    }
}

/// Moves `a` into a `T` when they are the same type.
fn cast<A: 'static, T: 'static>(a: A) -> Result<T, A> {
    let mut slot = Some(a);
    match (&mut slot as &mut dyn Any).downcast_mut::<Option<T>>() {
        Some(t) => Ok(t.take().expect("filled just above")),
        None => Err(slot.expect("taken only on success")),
    }
}

/// [`cast`] of an optional value: `Err` when it is present and of another type.
fn cast_opt<A: 'static, T: 'static>(a: Option<A>) -> Result<Option<T>, ()> {
    a.map(|a| cast::<A, T>(a).map_err(|_| ())).transpose()
}

/// Runs the layer on the project's kernels when `B` is `Flex` or `Autodiff<Flex>`; `None` for
/// any other backend.
fn run<B: Backend>(
    x: Tensor<B, 4>,
    weight: Tensor<B, 4>,
    bias: Option<Tensor<B, 1>>,
    spec: &Spec,
) -> Option<Tensor<B, 4>> {
    fn prim<K: Backend, const D: usize>(t: Tensor<K, D>) -> K::FloatTensorPrimitive {
        t.into_primitive().tensor()
    }
    fn wrap<K: Backend, const D: usize>(t: K::FloatTensorPrimitive) -> Tensor<K, D> {
        Tensor::from_primitive(TensorPrimitive::Float(t))
    }
    if let Ok(x) = cast::<Tensor<B, 4>, Tensor<FlexAd, 4>>(x.clone()) {
        let w = cast::<_, Tensor<FlexAd, 4>>(weight).ok()?;
        let b = cast_opt::<_, Tensor<FlexAd, 1>>(bias).ok()?;
        let y = autodiff_conv(prim(x), prim(w), b.map(prim), spec.clone());
        return cast::<Tensor<FlexAd, 4>, Tensor<B, 4>>(wrap(y)).ok();
    }
    if let Ok(x) = cast::<Tensor<B, 4>, Tensor<Flex, 4>>(x) {
        let w = cast::<_, Tensor<Flex, 4>>(weight).ok()?;
        let b = cast_opt::<_, Tensor<Flex, 1>>(bias).ok()?;
        let y = forward(&prim(x), &prim(w), b.map(prim).as_ref(), spec);
        return cast::<Tensor<Flex, 4>, Tensor<B, 4>>(wrap(y)).ok();
    }
    None
}

/// A convolution (or transposed convolution) as the kernels see it.
#[derive(Debug, Clone)]
struct Spec {
    transpose: bool,
    /// Conv: from the input's images to the output. Transposed: from the output's images to
    /// the input.
    g: ConvGeometry,
    /// The weight's first dimension: conv output channels, or transposed-conv input channels.
    o: usize,
    /// ReLU fused after the bias.
    relu: bool,
}

/// The f32 values of `t` in row-major order.
fn values(t: &FlexTensor) -> std::borrow::Cow<'_, [f32]> {
    match t.as_slice::<f32>() {
        Some(s) => std::borrow::Cow::Borrowed(s),
        None => std::borrow::Cow::Owned(
            t.to_contiguous()
                .as_slice::<f32>()
                .unwrap_or_default()
                .to_vec(),
        ),
    }
}

fn tensor(values: Vec<f32>, shape: impl Into<Shape>) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(values, shape.into()))
}

/// The forward pass on flex tensors.
fn forward(x: &FlexTensor, w: &FlexTensor, b: Option<&FlexTensor>, s: &Spec) -> FlexTensor {
    let n = x.shape()[0];
    let (xv, wv) = (values(x), values(w));
    let bv = b.map(values);
    let g = &s.g;
    let epilogue = Epilogue {
        bias: bv.as_deref(),
        relu: s.relu,
    };
    if s.transpose {
        let y = conv_backward_data(g, &xv, &wv, s.o, epilogue);
        tensor(y, [n, g.c, g.h, g.w])
    } else if let Some(sw) = prefers_swapped(g, s.o) {
        let ws = swap_weight(&wv, s.o, g.c, g.kh, g.kw);
        let y = conv_backward_data(&sw, &xv, &ws, g.c, epilogue);
        tensor(y, [n, s.o, g.oh, g.ow])
    } else {
        let y = conv_forward(g, &xv, &wv, epilogue, s.o);
        tensor(y, [n, s.o, g.oh, g.ow])
    }
}

/// The gradients `(dx, dW, db)` that `needed` asks for, given the output gradient `dy` (and,
/// with a fused ReLU, the output `y`).
fn backward(
    x: &FlexTensor,
    w: &FlexTensor,
    y: Option<&FlexTensor>,
    dy: &FlexTensor,
    s: &Spec,
    needed: [bool; 3],
) -> [Option<FlexTensor>; 3] {
    let (xv, wv) = (values(x), values(w));
    let dyv = match y {
        // Through the ReLU first: the rest is the plain convolution's backward pass.
        Some(y) => std::borrow::Cow::Owned(relu_backward(&values(dy), &values(y))),
        None => values(dy),
    };
    let (g, n) = (&s.g, x.shape()[0]);
    let w_shape = w.shape();
    if s.transpose {
        // Input x [n, o, oh, ow], output dy [n, c, h, w] (the images).
        let dx =
            needed[0].then(|| tensor(conv_forward(g, &dyv, &wv, Epilogue::NONE, s.o), x.shape()));
        let dw =
            needed[1].then(|| tensor(conv_backward_weight(g, &dyv, &xv, s.o).0, w_shape.clone()));
        let db = needed[2].then(|| tensor(channel_sums(&dyv, g.c, g.h * g.w), [g.c]));
        [dx, dw, db]
    } else if let Some(sw) = prefers_swapped(g, s.o) {
        let ws = swap_weight(&wv, s.o, g.c, g.kh, g.kw);
        let dx =
            needed[0].then(|| tensor(conv_forward(&sw, &dyv, &ws, Epilogue::NONE, g.c), x.shape()));
        let dw = needed[1].then(|| {
            let (dws, _) = conv_backward_weight(&sw, &dyv, &xv, g.c);
            tensor(swap_weight(&dws, g.c, s.o, g.kh, g.kw), w_shape.clone())
        });
        let db = needed[2].then(|| tensor(channel_sums(&dyv, s.o, g.p()), [s.o]));
        [dx, dw, db]
    } else {
        let dx = needed[0].then(|| {
            tensor(
                conv_backward_data(g, &dyv, &wv, s.o, Epilogue::NONE),
                [n, g.c, g.h, g.w],
            )
        });
        let (dw, db) = if needed[1] || needed[2] {
            let (dw, db) = conv_backward_weight(g, &xv, &dyv, s.o);
            (
                needed[1].then(|| tensor(dw, w_shape.clone())),
                needed[2].then(|| tensor(db, [s.o])),
            )
        } else {
            (None, None)
        };
        [dx, dw, db]
    }
}

/// The backward step of [`autodiff_conv`]: parents are `[x, weight]` or `[x, weight, bias]`.
#[derive(Debug)]
struct ConvBackward;

impl<const N: usize> Backward<Flex, N> for ConvBackward {
    /// The forward inputs `x` and `weight`, the output when a ReLU is fused, and the spec.
    type State = (FlexTensor, FlexTensor, Option<FlexTensor>, Spec);

    fn backward(self, ops: Ops<Self::State, N>, grads: &mut Gradients, _: &mut Checkpointer) {
        let dy = grads.consume::<Flex>(&ops.node);
        let (x, w, y, spec) = ops.state;
        let parent = |i: usize| ops.parents.get(i).cloned().flatten();
        let nodes = [parent(0), parent(1), parent(2)];
        let needed = [nodes[0].is_some(), nodes[1].is_some(), nodes[2].is_some()];
        let computed = backward(&x, &w, y.as_ref(), &dy, &spec, needed);
        for (node, grad) in nodes.into_iter().zip(computed) {
            if let (Some(node), Some(grad)) = (node, grad) {
                grads.register::<Flex>(node.id, grad);
            }
        }
    }
}

type AdTensor = <FlexAd as burn::tensor::backend::BackendTypes>::FloatTensorPrimitive;

/// The convolution as an autodiff operation on `Autodiff<Flex>`.
fn autodiff_conv(x: AdTensor, w: AdTensor, b: Option<AdTensor>, spec: Spec) -> AdTensor {
    let out = forward(
        &x.primitive,
        &w.primitive,
        b.as_ref().map(|b| &b.primitive),
        &spec,
    );
    let y = spec.relu.then(|| out.clone());
    let state = (x.primitive.clone(), w.primitive.clone(), y, spec);
    match b {
        Some(b) => match ConvBackward
            .prepare::<NoCheckpointing>([x.node.clone(), w.node.clone(), b.node.clone()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => prep.finish(state, out),
            OpsKind::UnTracked(prep) => prep.finish(out),
        },
        None => match ConvBackward
            .prepare::<NoCheckpointing>([x.node.clone(), w.node.clone()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => prep.finish(state, out),
            OpsKind::UnTracked(prep) => prep.finish(out),
        },
    }
}

#[cfg(test)]
mod tests {
    //! The kernels against burn's own ops, through the real models and real images: the same
    //! losses over a few Adam steps, and the same gradients.
    use super::*;
    use crate::data::batch::images_tensor;
    use crate::data::{FashionMnist, Split, DEFAULT_DATA_DIR};
    use crate::models::vae::vae_losses;
    use crate::models::{named_params, VaeConfig};
    use burn::module::AutodiffModule;
    use burn::optim::{AdamConfig, GradientsParams, Optimizer};

    fn images() -> FashionMnist {
        FashionMnist::load_images(
            std::path::Path::new(DEFAULT_DATA_DIR),
            Split::Train,
            Some(48),
        )
        .expect("the Fashion-MNIST package (scripts/setup.sh installs it)")
    }

    /// Losses of `steps` Adam steps on the reference VAE (fixed noise), and the gradient of every
    /// parameter at the first step.
    fn vae_run(
        mut model: crate::models::Vae<FlexAd>,
        steps: usize,
    ) -> (Vec<f32>, Vec<(String, Vec<f32>)>) {
        let device = burn::backend::flex::FlexDevice;
        let mut optim = AdamConfig::new().init::<FlexAd, _>();
        let data = images();
        let mut losses = Vec::new();
        let mut first_grads = Vec::new();
        for step in 0..steps {
            let idx: Vec<usize> = (0..16).map(|i| (i + step * 16) % data.len()).collect();
            let x = images_tensor::<FlexAd>(&data, &idx, &device);
            let noise = Tensor::<FlexAd, 2>::from_data(
                TensorData::new(
                    (0..16 * 32)
                        .map(|i| ((i * 7919 % 101) as f32 / 50.0) - 1.0)
                        .collect::<Vec<f32>>(),
                    [16, 32],
                ),
                &device,
            );
            let (recon, kl) = vae_losses(&model.forward(x.clone(), noise), x);
            let loss = recon + kl;
            losses.push(loss.clone().into_scalar());
            let grads = GradientsParams::from_grads(loss.backward(), &model);
            if step == 0 {
                let g = burn::module::Module::map(model.clone(), &mut GradCopy(&grads));
                first_grads = named_params(&g.valid()).expect("host copy");
            }
            model = optim.step(1e-3, model, grads);
        }
        (losses, first_grads)
    }

    /// Replaces every parameter by its gradient, to read all gradients with their names.
    struct GradCopy<'a>(&'a GradientsParams);
    impl burn::module::ModuleMapper<FlexAd> for GradCopy<'_> {
        fn map_float<const D: usize>(
            &mut self,
            param: burn::module::Param<Tensor<FlexAd, D>>,
        ) -> burn::module::Param<Tensor<FlexAd, D>> {
            let grad = self
                .0
                .get::<Flex, D>(param.id)
                .unwrap_or_else(|| param.val().inner().zeros_like());
            burn::module::Param::initialized(param.id, Tensor::from_inner(grad))
        }
    }

    #[test]
    fn vae_steps_match_burns_ops() {
        // One initial model for both (the backend's RNG is shared with tests running alongside).
        let model = VaeConfig::default().init::<FlexAd>(&burn::backend::flex::FlexDevice);
        // Parameters initialise lazily, each copy on its own: initialise them before copying.
        named_params(&model).expect("host copy");
        let (ours, our_grads) = vae_run(model.clone(), 4);
        let (burns, burn_grads) = with_burn_ops(|| vae_run(model, 4));
        for (a, b) in ours.iter().zip(&burns) {
            assert!(
                (a - b).abs() <= 1e-4 * b.abs(),
                "losses {ours:?} vs burn {burns:?}"
            );
        }
        assert_eq!(our_grads.len(), burn_grads.len());
        for ((name, a), (_, b)) in our_grads.iter().zip(&burn_grads) {
            let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
            let diff = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
            // f32 sums in another order: conv1's 9 weights each sum 16 x 784 products, and
            // differences up to 1.3e-3 of the largest gradient were seen on some random inits.
            // A wrong kernel is off by the gradient's own size.
            assert!(
                diff <= 5e-3 * scale,
                "{name}: max gradient difference {diff} (scale {scale})"
            );
        }
    }

    #[test]
    fn inference_and_unsupported_layers_match_burns_ops() {
        // On the inner backend (scoring), with padding `Same` (not ours: burn's op runs) and a
        // transposed conv with output padding.
        use burn::nn::conv::{Conv2dConfig, ConvTranspose2dConfig};
        let device = burn::backend::flex::FlexDevice;
        let x =
            Tensor::<Flex, 4>::random([3, 5, 9, 8], burn::tensor::Distribution::Default, &device);
        let layers = [
            Conv2dConfig::new([5, 6], [3, 3]).with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1)),
            Conv2dConfig::new([5, 6], [3, 3]).with_padding(PaddingConfig2d::Same),
            Conv2dConfig::new([5, 2], [2, 3]).with_stride([2, 1]),
        ];
        for cfg in layers {
            let layer = cfg.init::<Flex>(&device);
            let ours = conv2d(&layer, x.clone());
            let burns = layer.forward(x.clone());
            let diff = (ours - burns.clone()).abs().max().into_scalar();
            assert!(diff < 1e-4, "{cfg:?}: {diff}");
            let fused = conv2d_relu(&layer, x.clone());
            let diff = (fused - relu(burns)).abs().max().into_scalar();
            assert!(diff < 1e-4, "{cfg:?} with ReLU: {diff}");
        }
        for (stride, padding, out_pad) in [([2, 2], [1, 1], [0, 0]), ([2, 3], [0, 1], [1, 2])] {
            let layer = ConvTranspose2dConfig::new([5, 4], [4, 3])
                .with_stride(stride)
                .with_padding(padding)
                .with_padding_out(out_pad)
                .init::<Flex>(&device);
            let ours = conv_transpose2d(&layer, x.clone());
            let burns = layer.forward(x.clone());
            assert_eq!(ours.dims(), burns.dims());
            let diff = (ours - burns.clone()).abs().max().into_scalar();
            assert!(diff < 1e-4, "stride {stride:?} padding {padding:?}: {diff}");
            let fused = conv_transpose2d_relu(&layer, x.clone());
            let diff = (fused - relu(burns)).abs().max().into_scalar();
            assert!(
                diff < 1e-4,
                "stride {stride:?} padding {padding:?} with ReLU: {diff}"
            );
        }
    }
}
