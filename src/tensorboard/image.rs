//! Grayscale images for TensorBoard: grids of 28x28 tiles, PNG encoding.

use anyhow::{Context, Result};

/// An 8-bit grayscale image, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct GrayImage {
    pub width: usize,
    pub height: usize,
    pub pixels: Vec<u8>,
}

impl GrayImage {
    /// Encodes as an 8-bit grayscale PNG.
    pub fn to_png(&self) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        {
            let mut encoder = png::Encoder::new(&mut out, self.width as u32, self.height as u32);
            encoder.set_color(png::ColorType::Grayscale);
            encoder.set_depth(png::BitDepth::Eight);
            let mut writer = encoder.write_header().context("PNG header")?;
            writer.write_image_data(&self.pixels).context("PNG data")?;
        }
        Ok(out)
    }
}

/// Gray of the gaps between tiles: apart from black backgrounds and from the 0.5 gray of an
/// untrained decoder.
const PAD_GRAY: u8 = 80;

/// Lays `images` (each `h*w` values in [0, 1], row-major) out row by row, `cols` per row, with
/// `pad` pixels of [`PAD_GRAY`] between tiles. Values are clamped to [0, 1].
pub fn image_grid(images: &[&[f32]], h: usize, w: usize, cols: usize, pad: usize) -> GrayImage {
    let cols = cols.max(1).min(images.len().max(1));
    let rows = images.len().div_ceil(cols).max(1);
    let width = cols * w + (cols + 1) * pad;
    let height = rows * h + (rows + 1) * pad;
    let mut pixels = vec![PAD_GRAY; width * height];
    for (i, img) in images.iter().enumerate() {
        let (r, c) = (i / cols, i % cols);
        let (y0, x0) = (pad + r * (h + pad), pad + c * (w + pad));
        for y in 0..h {
            for x in 0..w {
                let v = img.get(y * w + x).copied().unwrap_or(0.0);
                pixels[(y0 + y) * width + x0 + x] = (v.clamp(0.0, 1.0) * 255.0).round() as u8;
            }
        }
    }
    GrayImage {
        width,
        height,
        pixels,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grid_places_tiles_and_encodes() {
        let white = vec![1.0f32; 4];
        let black = vec![0.0f32; 4];
        let g = image_grid(&[&white, &black, &white], 2, 2, 2, 1);
        assert_eq!((g.width, g.height), (7, 7));
        assert_eq!(g.pixels[8], 255); // (1,1): first tile
        assert_eq!(g.pixels[7 + 4], 0); // (1,4): second tile
        assert_eq!(g.pixels[4 * 7 + 1], 255); // (4,1): third tile
        assert_eq!(g.pixels[0], PAD_GRAY); // padding
        let png = g.to_png().unwrap();
        assert_eq!(&png[1..4], b"PNG");
    }
}
