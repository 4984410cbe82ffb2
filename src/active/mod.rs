//! Active learning: the pool and ledger bookkeeping ([`pool`]) apart from the acquisition
//! strategies ([`strategies`]), which are pure functions from scores and embeddings to picks.

pub mod pool;
pub mod strategies;

pub use pool::{Pool, ValidationSlice, AUDIT_STRATEGY, VALIDATION_STRATEGY};
pub use strategies::{Pick, PoolView, Strategy};
