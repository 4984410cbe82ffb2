//! Models: the encoders and the pretraining models built on them, and the classifier.

pub mod classifier;
pub mod encoder;
pub mod norm;
pub mod resnet;
pub mod simclr;
pub mod vae;

pub use classifier::{Classifier, ClassifierInput};
pub use encoder::{ConvEncoder, ConvEncoderConfig, Encoder, EncoderConfig};
pub use resnet::{ResNetEncoder, ResNetEncoderConfig};
pub use simclr::{Simclr, SimclrConfig};
pub use vae::{Vae, VaeConfig, VaeOutput};

use anyhow::Result;
use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::tensor::{backend::Backend, Tensor};

/// A tensor's values on the host, as f32 (for reports; never inside the training step).
pub fn host_values<B: Backend, const D: usize>(tensor: Tensor<B, D>) -> Result<Vec<f32>> {
    tensor
        .into_data()
        .convert::<f32>()
        .to_vec::<f32>()
        .map_err(|e| anyhow::anyhow!("cannot copy a tensor to the host: {e:?}"))
}

/// The exponential moving average of weights: every float parameter of `ema` becomes
/// `decay * ema + (1 - decay) * model`. Both modules must have the same structure (e.g. `ema` a
/// copy of `model` from earlier), which fixes the order the parameters are visited in.
pub fn ema_update<B: Backend, M: Module<B>>(ema: M, model: &M, decay: f64) -> M {
    struct Collect<B: Backend>(Vec<Tensor<B, 1>>);
    impl<B: Backend> ModuleVisitor<B> for Collect<B> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            let t = param.val();
            let n = t.shape().num_elements();
            self.0.push(t.reshape([n]));
        }
    }
    struct Blend<B: Backend> {
        source: std::vec::IntoIter<Tensor<B, 1>>,
        decay: f64,
    }
    impl<B: Backend> ModuleMapper<B> for Blend<B> {
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
            let (id, tensor, mapper) = param.consume();
            let blended = match self.source.next() {
                Some(src) => {
                    let shape = tensor.shape();
                    tensor.mul_scalar(self.decay) + src.reshape(shape).mul_scalar(1.0 - self.decay)
                }
                None => tensor,
            };
            Param::from_mapped_value(id, blended, mapper)
        }
    }
    let mut collect = Collect(Vec::new());
    model.visit(&mut collect);
    ema.map(&mut Blend {
        source: collect.0.into_iter(),
        decay,
    })
}

/// Every float parameter of `module` with its dotted path (e.g. `encoder.conv1.weight`), copied
/// to the host. For histograms and checksums, not for the training loop.
pub fn named_params<B: Backend, M: Module<B>>(module: &M) -> Result<Vec<(String, Vec<f32>)>> {
    struct Collect {
        path: Vec<String>,
        out: Vec<(String, Result<Vec<f32>>)>,
    }
    impl<B: Backend> ModuleVisitor<B> for Collect {
        fn enter_module(&mut self, name: &str, _container_type: &str) {
            self.path.push(name.to_string());
        }
        fn exit_module(&mut self, _name: &str, _container_type: &str) {
            self.path.pop();
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            self.out
                .push((self.path.join("."), host_values(param.val())));
        }
    }
    let mut c = Collect {
        path: Vec::new(),
        out: Vec::new(),
    };
    module.visit(&mut c);
    c.out
        .into_iter()
        .map(|(name, values)| Ok((name, values?)))
        .collect()
}

/// A fingerprint of the weights (sum and sum of squares over every parameter, in f64), to check
/// that two runs ended with the same model.
pub fn weights_fingerprint<B: Backend, M: Module<B>>(module: &M) -> Result<(f64, f64)> {
    Ok(named_params(module)?
        .iter()
        .flat_map(|(_, v)| v.iter())
        .fold((0.0, 0.0), |(s, q), &x| {
            (s + x as f64, q + (x as f64) * (x as f64))
        }))
}
