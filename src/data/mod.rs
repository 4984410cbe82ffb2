//! Data: the IDX files of Fashion-MNIST, the in-memory dataset, and batches as tensors.
//!
//! Flow: files ([`idx`]) -> [`FashionMnist`] (u8 pixels in memory) -> [`batch`] (f32 tensors).

pub mod augment;
pub mod batch;
mod fashion;
pub mod idx;

pub use fashion::{pixel_value, FashionMnist, Split, CLASS_NAMES, DEFAULT_DATA_DIR, IMAGE_SIDE};
