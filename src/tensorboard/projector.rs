//! TensorBoard's embedding projector, written as plain files next to an event file:
//! `projector_config.pbtxt`, a TSV of vectors, a TSV of metadata and a sprite image.

use std::path::Path;

use anyhow::{ensure, Context, Result};

use super::image_grid;

/// One set of embeddings to show in the projector.
pub struct Embedding<'a> {
    /// Name shown in the projector's drop-down.
    pub name: &'a str,
    /// `[n, dim]` row-major.
    pub vectors: &'a [f32],
    pub dim: usize,
    /// Column names and one row per vector (e.g. `["label", "class"]`).
    pub metadata_header: &'a [&'a str],
    pub metadata: &'a [Vec<String>],
    /// Optional thumbnails: `n` images of `side x side` values in [0, 1].
    pub sprite: Option<(&'a [f32], usize)>,
}

/// Writes the projector files for `emb` into `dir` (which must hold, or later hold, an event file:
/// TensorBoard only looks for projector configs in run directories).
pub fn write_projector(dir: &Path, emb: &Embedding) -> Result<()> {
    ensure!(
        emb.dim > 0 && emb.vectors.len().is_multiple_of(emb.dim),
        "embedding shape mismatch"
    );
    let n = emb.vectors.len() / emb.dim;
    ensure!(
        emb.metadata.len() == n,
        "{} metadata rows for {n} vectors",
        emb.metadata.len()
    );
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let stem = emb
        .name
        .replace(|c: char| !c.is_ascii_alphanumeric() && c != '_', "_");

    let mut tensors = String::with_capacity(n * emb.dim * 10);
    for row in emb.vectors.chunks(emb.dim) {
        let cells: Vec<String> = row.iter().map(|v| format!("{v}")).collect();
        tensors.push_str(&cells.join("\t"));
        tensors.push('\n');
    }
    write(dir, &format!("{stem}_tensors.tsv"), tensors.as_bytes())?;

    // One column: no header line (TensorBoard's rule); more: a header line first.
    let mut meta = String::new();
    if emb.metadata_header.len() > 1 {
        meta.push_str(&emb.metadata_header.join("\t"));
        meta.push('\n');
    }
    for row in emb.metadata {
        meta.push_str(&row.join("\t").replace('\n', " "));
        meta.push('\n');
    }
    write(dir, &format!("{stem}_metadata.tsv"), meta.as_bytes())?;

    let mut config = format!(
        "embeddings {{\n  tensor_name: \"{}\"\n  tensor_path: \"{stem}_tensors.tsv\"\n  metadata_path: \"{stem}_metadata.tsv\"\n  tensor_shape: {n}\n  tensor_shape: {}\n",
        emb.name, emb.dim
    );
    if let Some((images, side)) = emb.sprite {
        ensure!(
            images.len() == n * side * side,
            "sprite needs {n} images of {side}x{side}"
        );
        // A square sheet, tiles row by row, no padding (the projector slices it by tile size).
        let cols = (n as f64).sqrt().ceil() as usize;
        ensure!(
            cols * side <= 8192,
            "sprite would exceed 8192x8192 pixels; use fewer points"
        );
        let tiles: Vec<&[f32]> = images.chunks(side * side).collect();
        let sheet = image_grid(&tiles, side, side, cols, 0);
        // The grid is only as wide as needed; the projector expects cols x cols tiles.
        let mut square = vec![0u8; cols * side * cols * side];
        for y in 0..sheet.height {
            let row = &sheet.pixels[y * sheet.width..(y + 1) * sheet.width];
            square[y * cols * side..y * cols * side + sheet.width].copy_from_slice(row);
        }
        let square = super::GrayImage {
            width: cols * side,
            height: cols * side,
            pixels: square,
        };
        write(dir, &format!("{stem}_sprite.png"), &square.to_png()?)?;
        config.push_str(&format!(
            "  sprite {{\n    image_path: \"{stem}_sprite.png\"\n    single_image_dim: {side}\n    single_image_dim: {side}\n  }}\n"
        ));
    }
    config.push_str("}\n");
    write(dir, "projector_config.pbtxt", config.as_bytes())
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> Result<()> {
    crate::checkpoint::write_atomic(&dir.join(name), bytes)
}
