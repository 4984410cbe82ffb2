//! Active learning: the pool bookkeeping and the acquisition strategies.
pub mod strategies;
