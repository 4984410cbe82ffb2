//! frugal: label-efficient image classification.
//!
//! Self-supervised pretraining on all unlabeled images, then (later stages) active learning on a
//! label budget. Data flows one way: files ([`data`]) -> batches -> models ([`models`]) ->
//! training ([`pretrain`]) -> metrics and logs ([`tensorboard`], [`run`]).

pub mod active;
pub mod bench;
pub mod checkpoint;
pub mod cli;
pub mod config;
pub mod data;
pub mod device;
pub mod embed;
pub mod finetune;
pub mod kernels;
pub mod labels;
pub mod models;
pub mod pretrain;
pub mod progress;
pub mod run;
pub mod tensorboard;
