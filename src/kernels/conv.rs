//! 2-D convolution on the CPU as im2col + one large matrix product per chunk of images, f32,
//! NCHW, stride and padding, no dilation or groups. Three kernels serve the six operations of
//! conv and transposed conv, forward and backward:
//!
//! - [`conv_forward`]: `y = W · im2col(x)` (conv forward; transposed conv's input gradient),
//! - [`conv_backward_data`]: `dx = col2im(Wᵀ · dy)` (conv's input gradient; transposed conv forward),
//! - [`conv_backward_weight`]: `dW = dy · im2col(x)ᵀ` (conv's weight gradient; transposed conv's
//!   with the roles of input and output swapped).
//!
//! Each rayon task takes a chunk of images whose unfolded columns fit in the core's L2 cache, so
//! the `[K, chunk * P]` column matrix is written and read back from cache, and multiplies it in one
//! `gemm` call (AVX-512 kernels where the CPU has them).

use std::cell::RefCell;

use rayon::prelude::*;

use super::rows::{self, RowJob, Rows};

/// The shapes of a convolution from images `[c, h, w]` to outputs `[oh, ow]` with a `kh x kw`
/// kernel. For a transposed convolution, the "image" is its output and the "outputs" its input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvGeometry {
    pub c: usize,
    pub h: usize,
    pub w: usize,
    pub kh: usize,
    pub kw: usize,
    pub stride: [usize; 2],
    pub padding: [usize; 2],
    pub oh: usize,
    pub ow: usize,
}

impl ConvGeometry {
    /// A convolution of `[c, h, w]` images; the output size follows from kernel, stride, padding.
    pub fn new(
        [c, h, w]: [usize; 3],
        [kh, kw]: [usize; 2],
        stride: [usize; 2],
        padding: [usize; 2],
    ) -> Self {
        let out = |n: usize, k: usize, s: usize, p: usize| (n + 2 * p).saturating_sub(k) / s + 1;
        Self {
            c,
            h,
            w,
            kh,
            kw,
            stride,
            padding,
            oh: out(h, kh, stride[0], padding[0]),
            ow: out(w, kw, stride[1], padding[1]),
        }
    }

    /// Rows of the column matrix: `c * kh * kw`.
    pub fn k(&self) -> usize {
        self.c * self.kh * self.kw
    }

    /// Output positions per image: `oh * ow`.
    pub fn p(&self) -> usize {
        self.oh * self.ow
    }

    /// Pixels per image: `c * h * w`.
    pub fn image_len(&self) -> usize {
        self.c * self.h * self.w
    }

    /// Images per task: enough columns for an efficient product, few enough that the column
    /// matrix (`k * p` floats per image) stays within about 1 MiB of L2.
    fn chunk(&self, n: usize) -> usize {
        if self.p() >= 256 {
            // Enough columns in one image: one product per image, written in place.
            return 1;
        }
        let per_image = (self.k() * self.p()).max(1);
        (262_144 / per_image).clamp(1, n.max(1))
    }

    /// The stride-1 convolution whose input gradient this one's forward pass is, for the
    /// "swapped" evaluation of thin convolutions (see [`swapped`]): images `[o, oh, ow]`, kernel
    /// flipped, padding `k - 1 - p`. `None` unless stride is 1 and padding at most `k - 1`.
    pub fn swapped(&self, o: usize) -> Option<ConvGeometry> {
        let ok = self.stride == [1, 1] && self.padding[0] < self.kh && self.padding[1] < self.kw;
        ok.then(|| ConvGeometry {
            c: o,
            h: self.oh,
            w: self.ow,
            kh: self.kh,
            kw: self.kw,
            stride: [1, 1],
            padding: [self.kh - 1 - self.padding[0], self.kw - 1 - self.padding[1]],
            oh: self.h,
            ow: self.w,
        })
    }

    /// For output row `o` and kernel offset `ki` (stride `s`, padding `p`, input size `n`): the
    /// output range `[lo, hi)` whose input index `o * s + ki - p` lies in `[0, n)`.
    fn valid(out: usize, ki: usize, s: usize, p: usize, n: usize) -> (usize, usize) {
        // o * s + ki >= p  and  o * s + ki < p + n
        let lo = p.saturating_sub(ki).div_ceil(s);
        let hi = if p + n > ki {
            (p + n - ki).div_ceil(s)
        } else {
            0
        };
        (lo.min(out), hi.min(out).max(lo.min(out)))
    }
}

/// Floats of the phase-split copy of an image (see [`phase_split`]).
fn phased_len(g: &ConvGeometry) -> usize {
    let s = g.stride[1];
    g.c * g.h * s * g.w.div_ceil(s)
}

/// Splits each image row into its `s = stride[1]` column phases, so that the columns a strided
/// kernel tap reads are contiguous: `out[((c * h + y) * s + r) * wp + j] = img[c, y, r + s * j]`
/// (0 past the row's end), `wp = ceil(w / s)`. With stride 1 this is a plain copy, which callers
/// skip (see [`phased`]).
#[inline(always)]
fn phase_split(g: &ConvGeometry, img: &[f32], out: &mut [f32]) {
    let s = g.stride[1];
    let wp = g.w.div_ceil(s);
    for (row, dst) in img.chunks_exact(g.w).zip(out.chunks_exact_mut(s * wp)) {
        if s == 2 {
            let (even, odd) = dst.split_at_mut(wp);
            for ((e, o), pair) in even.iter_mut().zip(odd.iter_mut()).zip(row.chunks_exact(2)) {
                (*e, *o) = (pair[0], pair[1]);
            }
            if g.w % 2 == 1 {
                (even[wp - 1], odd[wp - 1]) = (row[g.w - 1], 0.0);
            }
            continue;
        }
        for (r, phase) in dst.chunks_exact_mut(wp).enumerate() {
            for (j, v) in phase.iter_mut().enumerate() {
                *v = row.get(r + s * j).copied().unwrap_or(0.0);
            }
        }
    }
}

/// The image in the layout [`im2col`] reads: itself for stride 1, else its [`phase_split`]
/// copy in `buf`.
#[inline(always)]
fn phased<'a>(g: &ConvGeometry, img: &'a [f32], buf: &'a mut [f32]) -> &'a [f32] {
    if g.stride[1] == 1 {
        img
    } else {
        phase_split(g, img, buf);
        buf
    }
}

/// The inverse of [`phase_split`]: writes the phases back into image rows.
#[inline(always)]
fn phase_merge(g: &ConvGeometry, phased: &[f32], img: &mut [f32]) {
    let s = g.stride[1];
    let wp = g.w.div_ceil(s);
    for (row, src) in img.chunks_exact_mut(g.w).zip(phased.chunks_exact(s * wp)) {
        if s == 2 {
            let (even, odd) = src.split_at(wp);
            for ((e, o), pair) in even.iter().zip(odd).zip(row.chunks_exact_mut(2)) {
                (pair[0], pair[1]) = (*e, *o);
            }
            if g.w % 2 == 1 {
                row[g.w - 1] = even[wp - 1];
            }
            continue;
        }
        for (x, v) in row.iter_mut().enumerate() {
            *v = src[(x % s) * wp + x / s];
        }
    }
}

/// For each kernel tap `(ki, kj)`: the output rows `[ylo, yhi)` and columns `[xlo, xhi)` whose
/// input lies inside the image, and where that input starts: row `oy * stride + ki - padding`,
/// phase `r` and phase index `xlo + dj` of a [`phase_split`] row.
struct Tap {
    ki: usize,
    ylo: usize,
    yhi: usize,
    xlo: usize,
    xhi: usize,
    r: usize,
    j0: usize,
}

#[inline(always)]
fn tap(g: &ConvGeometry, ki: usize, kj: usize) -> Tap {
    let [sh, sw] = g.stride;
    let [ph, pw] = g.padding;
    let (ylo, yhi) = ConvGeometry::valid(g.oh, ki, sh, ph, g.h);
    let (xlo, xhi) = ConvGeometry::valid(g.ow, kj, sw, pw, g.w);
    // Input column of output column xlo: xlo * sw + kj - pw = sw * j0 + r (non-negative when the
    // range is not empty).
    let ix = (xlo * sw + kj) as isize - pw as isize;
    let ix = ix.max(0) as usize;
    Tap {
        ki,
        ylo,
        yhi,
        xlo,
        xhi,
        r: ix % sw,
        j0: ix / sw,
    }
}

/// The [`Tap`] of every kernel offset, in row order (`ki * kw + kj`): computed once per kernel
/// call, shared by every image.
fn taps(g: &ConvGeometry) -> Vec<Tap> {
    (0..g.kh * g.kw)
        .map(|t| tap(g, t / g.kw, t % g.kw))
        .collect()
}

/// Writes the columns of one image from its [`phase_split`] copy:
/// `col[row, off + oy * ow + ox] = img[c, oy*s + ki - p, ox*s + kj - p]` (0 outside the image),
/// `row = (c * kh + ki) * kw + kj`, `col` row-major with row length `ld`.
#[inline(always)]
fn im2col<R: Rows>(
    rows: R,
    g: &ConvGeometry,
    taps: &[Tap],
    phased: &[f32],
    col: &mut [f32],
    ld: usize,
    off: usize,
) {
    let (sh, sw) = (g.stride[0], g.stride[1]);
    let wp = g.w.div_ceil(sw);
    for c in 0..g.c {
        for (k, t) in taps.iter().enumerate() {
            let (ki, row) = (t.ki, c * taps.len() + k);
            let dst = &mut col[row * ld + off..row * ld + off + g.p()];
            rows.zero(&mut dst[..t.ylo * g.ow]);
            rows.zero(&mut dst[t.yhi * g.ow..]);
            if t.yhi > t.ylo {
                // Output row oy reads input row oy * sh + ki - p: consecutive output rows are
                // sh input rows, sh * sw * wp floats of the phase-split image, apart.
                let iy = t.ylo * sh + ki - g.padding[0];
                let src = ((c * g.h + iy) * sw + t.r) * wp + t.j0;
                let d = &mut dst[t.ylo * g.ow..t.yhi * g.ow];
                rows.place_rows(d, g.ow, t.xlo, &phased[src..], sh * sw * wp, t.xhi - t.xlo);
            }
        }
    }
}

/// The adjoint of [`im2col`]: adds each column entry onto the pixel it came from, in a
/// [`phase_split`] layout (`phased` must start zeroed).
#[inline(always)]
fn col2im<R: Rows>(
    rows: R,
    g: &ConvGeometry,
    taps: &[Tap],
    col: &[f32],
    ld: usize,
    off: usize,
    phased: &mut [f32],
) {
    let (sh, sw) = (g.stride[0], g.stride[1]);
    let wp = g.w.div_ceil(sw);
    for c in 0..g.c {
        for (k, t) in taps.iter().enumerate() {
            let (ki, row) = (t.ki, c * taps.len() + k);
            let src = &col[row * ld + off..row * ld + off + g.p()];
            if t.yhi > t.ylo {
                let iy = t.ylo * sh + ki - g.padding[0];
                let d = ((c * g.h + iy) * sw + t.r) * wp + t.j0;
                let s = &src[t.ylo * g.ow..t.yhi * g.ow];
                let len = t.xhi - t.xlo;
                rows.add_rows(&mut phased[d..], sh * sw * wp, len, s, g.ow, t.xlo);
            }
        }
    }
}

/// A matrix view for [`matmul`]: element `(r, c)` at `data[r * rs + c * cs]`.
#[derive(Clone, Copy)]
struct View<'a> {
    data: &'a [f32],
    rs: usize,
    cs: usize,
}

impl<'a> View<'a> {
    /// Row-major with row stride `rs`.
    fn rows(data: &'a [f32], rs: usize) -> Self {
        Self { data, rs, cs: 1 }
    }

    /// Column-major with column stride `cs` (the transpose of a row-major matrix).
    fn cols(data: &'a [f32], cs: usize) -> Self {
        Self { data, rs: 1, cs }
    }
}

/// `dst[m x n] (row stride ldd) = (accumulate ? dst : 0) + a[m x k] · b[k x n]`.
fn matmul(
    (m, n, k): (usize, usize, usize),
    dst: &mut [f32],
    ldd: usize,
    accumulate: bool,
    a: View,
    b: View,
) {
    if m == 0 || n == 0 {
        return;
    }
    let last = |v: View, rows: usize, cols: usize| (rows - 1) * v.rs + (cols - 1) * v.cs;
    assert!(dst.len() > (m - 1) * ldd + n - 1, "matmul: dst too small");
    if k == 0 {
        if !accumulate {
            for r in 0..m {
                dst[r * ldd..r * ldd + n].fill(0.0);
            }
        }
        return;
    }
    assert!(a.data.len() > last(a, m, k), "matmul: lhs too small");
    assert!(b.data.len() > last(b, k, n), "matmul: rhs too small");
    // SAFETY: the asserts above keep every index the product touches inside the slices; `dst` is
    // borrowed mutably, so it aliases neither input.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            ldd as isize,
            accumulate,
            a.data.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr(),
            b.cs as isize,
            b.rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

thread_local! {
    /// Per-thread scratch for column matrices and gathered gradients, reused across calls.
    static SCRATCH: RefCell<[Vec<f32>; 3]> = const { RefCell::new([Vec::new(), Vec::new(), Vec::new()]) };
}

/// Runs `f` with three scratch buffers of `a`, `b` and `c` floats (contents unspecified).
fn with_scratch<R>(
    [a, b, c]: [usize; 3],
    f: impl FnOnce(&mut [f32], &mut [f32], &mut [f32]) -> R,
) -> R {
    SCRATCH.with(|s| {
        let [x, y, z] = &mut *s.borrow_mut();
        for (v, len) in [(&mut *x, a), (&mut *y, b), (&mut *z, c)] {
            if v.len() < len {
                v.resize(len, 0.0);
            }
        }
        f(&mut x[..a], &mut y[..b], &mut z[..c])
    })
}

/// What a kernel applies to each output plane while it is in cache: a per-channel bias, then
/// optionally ReLU (the layer's activation, fused).
#[derive(Debug, Clone, Copy, Default)]
pub struct Epilogue<'a> {
    /// `[channels]`, added to every value of the channel's plane.
    pub bias: Option<&'a [f32]>,
    /// `max(0, v)` after the bias.
    pub relu: bool,
}

impl<'a> Epilogue<'a> {
    /// Neither bias nor activation.
    pub const NONE: Epilogue<'static> = Epilogue {
        bias: None,
        relu: false,
    };

    /// A bias and no activation.
    pub fn bias(bias: &'a [f32]) -> Self {
        Self {
            bias: Some(bias),
            relu: false,
        }
    }

    /// Applies the epilogue to `plane`, the output plane of channel `channel`.
    #[inline(always)]
    fn apply(&self, plane: &mut [f32], channel: usize) {
        let add = self.bias.map_or(0.0, |b| b[channel]);
        match (add != 0.0, self.relu) {
            (_, true) => plane.iter_mut().for_each(|v| *v = (*v + add).max(0.0)),
            (true, false) => plane.iter_mut().for_each(|v| *v += add),
            (false, false) => {}
        }
    }
}

/// A vector of `len` floats built in parallel, `chunk` floats per task: `f(i, part)` fills part
/// `i`, which it receives zeroed. Each part is zeroed just before `f` writes it, while it is in
/// the core's cache, instead of one pass over the whole (cold) vector beforehand.
fn par_build(len: usize, chunk: usize, f: impl Fn(usize, &mut [f32]) + Sync) -> Vec<f32> {
    let mut v: Vec<f32> = Vec::with_capacity(len);
    v.spare_capacity_mut()[..len]
        .par_chunks_mut(chunk.max(1))
        .enumerate()
        .for_each(|(i, part)| {
            part.fill(std::mem::MaybeUninit::new(0.0));
            // SAFETY: every element of `part` was initialised just above; `MaybeUninit<f32>` and
            // `f32` have the same layout.
            let part = unsafe { &mut *(part as *mut [std::mem::MaybeUninit<f32>] as *mut [f32]) };
            f(i, part);
        });
    // SAFETY: the parts cover `0..len`, and each was initialised.
    unsafe { v.set_len(len) };
    v
}

/// One chunk of [`conv_forward`]: `b` images of `x` to their outputs in `y`.
struct ForwardChunk<'a> {
    g: &'a ConvGeometry,
    taps: &'a [Tap],
    weight: &'a [f32],
    epilogue: Epilogue<'a>,
    o: usize,
    x: &'a [f32],
    y: &'a mut [f32],
    /// Scratch: the `[k, b * p]` columns, the `[o, b * p]` product, one phase-split image.
    col: &'a mut [f32],
    out: &'a mut [f32],
    buf: &'a mut [f32],
}

impl RowJob for ForwardChunk<'_> {
    type Output = ();

    #[inline(always)]
    fn run<R: Rows>(self, rows: R) {
        let Self {
            g,
            taps,
            weight,
            epilogue,
            o,
            x,
            y,
            col,
            out,
            buf,
        } = self;
        let (il, k, p) = (g.image_len(), g.k(), g.p());
        let b = x.len() / il;
        let ld = b * p;
        unfold_images(rows, g, taps, x, col, buf);
        let w = View::rows(weight, k);
        if b == 1 {
            // One image: the product lands in place, no reordering.
            matmul((o, p, k), y, p, false, w, View::rows(col, p));
            for (oc, plane) in y.chunks_mut(p).enumerate() {
                epilogue.apply(plane, oc);
            }
            return;
        }
        matmul((o, ld, k), out, ld, false, w, View::rows(col, ld));
        // [o, b * p] -> [b, o, p], then the epilogue.
        for i in 0..b {
            for oc in 0..o {
                let src = &out[oc * ld + i * p..oc * ld + (i + 1) * p];
                let dst = &mut y[(i * o + oc) * p..(i * o + oc + 1) * p];
                rows.copy(dst, src);
                epilogue.apply(dst, oc);
            }
        }
    }
}

/// Convolution forward: `x [n, c, h, w]`, `weight [o, c * kh * kw]` (row-major `[o, c, kh, kw]`)
/// -> `[n, o, oh, ow]`, then the epilogue (bias `[o]`, ReLU).
pub fn conv_forward(
    g: &ConvGeometry,
    x: &[f32],
    weight: &[f32],
    epilogue: Epilogue,
    o: usize,
) -> Vec<f32> {
    let (il, k, p) = (g.image_len(), g.k(), g.p());
    let n = x.len() / il.max(1);
    assert_eq!(x.len(), n * il, "conv_forward: input length");
    assert_eq!(weight.len(), o * k, "conv_forward: weight length");
    let nb = g.chunk(n);
    let taps = taps(g);
    par_build(n * o * p, nb * o * p, |i, y| {
        let x = &x[i * nb * il..((i + 1) * nb).min(n) * il];
        let ld = x.len() / il * p;
        with_scratch([k * ld, o * ld, phased_len(g)], |col, out, buf| {
            rows::run(ForwardChunk {
                g,
                taps: &taps,
                weight,
                epilogue,
                o,
                x,
                y,
                col,
                out,
                buf,
            })
        })
    })
}

/// Writes the columns of every image of `x` (`[b, c, h, w]`) into `col` (`[k, b * p]`), using
/// `buf` for the phase-split copy.
#[inline(always)]
fn unfold_images<R: Rows>(
    rows: R,
    g: &ConvGeometry,
    taps: &[Tap],
    x: &[f32],
    col: &mut [f32],
    buf: &mut [f32],
) {
    let (il, p) = (g.image_len(), g.p());
    let b = x.len() / il;
    for i in 0..b {
        let img = phased(g, &x[i * il..(i + 1) * il], buf);
        im2col(rows, g, taps, img, col, b * p, i * p);
    }
}

/// `dy [b, o, p]` as the matrix `[o, b * p]`: itself for one image, else gathered into `dst`.
#[inline(always)]
fn channel_rows<'a, R: Rows>(
    rows: R,
    dy: &'a [f32],
    b: usize,
    o: usize,
    p: usize,
    dst: &'a mut [f32],
) -> &'a [f32] {
    if b == 1 {
        return dy;
    }
    let ld = b * p;
    for i in 0..b {
        for oc in 0..o {
            rows.copy(
                &mut dst[oc * ld + i * p..oc * ld + (i + 1) * p],
                &dy[(i * o + oc) * p..(i * o + oc + 1) * p],
            );
        }
    }
    &dst[..o * ld]
}

/// One chunk of [`conv_backward_data`]: the gradients `dx` of `b` images from their `dy`.
struct BackwardDataChunk<'a> {
    g: &'a ConvGeometry,
    taps: &'a [Tap],
    weight: &'a [f32],
    o: usize,
    epilogue: Epilogue<'a>,
    dy: &'a [f32],
    /// Zeroed on entry.
    dx: &'a mut [f32],
    /// Scratch: the `[k, b * p]` columns, the gathered `[o, b * p]` gradient, one phase-split
    /// image.
    col: &'a mut [f32],
    gathered: &'a mut [f32],
    phased: &'a mut [f32],
}

impl RowJob for BackwardDataChunk<'_> {
    type Output = ();

    #[inline(always)]
    fn run<R: Rows>(self, rows: R) {
        let Self {
            g,
            taps,
            weight,
            o,
            epilogue,
            dy,
            dx,
            col,
            gathered,
            phased,
        } = self;
        let (il, k, p) = (g.image_len(), g.k(), g.p());
        let b = dy.len() / (o * p);
        let ld = b * p;
        // One image's gradient is already the [o, p] matrix.
        let dy_rows = channel_rows(rows, dy, b, o, p, gathered);
        // Wᵀ: element (r, c) of the [k, o] matrix is weight[c * k + r].
        let wt = View::cols(weight, k);
        matmul((k, ld, o), col, ld, false, wt, View::rows(dy_rows, ld));
        for i in 0..b {
            let img = &mut dx[i * il..(i + 1) * il];
            if g.stride[1] == 1 {
                col2im(rows, g, taps, col, ld, i * p, img);
            } else {
                rows.zero(phased);
                col2im(rows, g, taps, col, ld, i * p, phased);
                phase_merge(g, phased, img);
            }
            for (c, plane) in img.chunks_exact_mut(g.h * g.w).enumerate() {
                epilogue.apply(plane, c);
            }
        }
    }
}

/// Convolution input gradient: `dy [n, o, oh, ow]`, `weight [o, c * kh * kw]` -> `dx [n, c, h, w]`,
/// then the epilogue (bias `[c]`, ReLU: for a transposed convolution's forward pass).
pub fn conv_backward_data(
    g: &ConvGeometry,
    dy: &[f32],
    weight: &[f32],
    o: usize,
    epilogue: Epilogue,
) -> Vec<f32> {
    let (il, k, p) = (g.image_len(), g.k(), g.p());
    let n = dy.len() / (o * p).max(1);
    assert_eq!(dy.len(), n * o * p, "conv_backward_data: gradient length");
    assert_eq!(weight.len(), o * k, "conv_backward_data: weight length");
    let nb = g.chunk(n);
    let taps = taps(g);
    par_build(n * il, nb * il, |i, dx| {
        let dy = &dy[i * nb * o * p..((i + 1) * nb).min(n) * o * p];
        let ld = dy.len() / o;
        with_scratch([k * ld, o * ld, phased_len(g)], |col, gathered, phased| {
            rows::run(BackwardDataChunk {
                g,
                taps: &taps,
                weight,
                o,
                epilogue,
                dy,
                dx,
                col,
                gathered,
                phased,
            })
        })
    })
}

/// One chunk of [`conv_backward_weight`]: adds the weight and bias gradients of `b` images.
struct BackwardWeightChunk<'a> {
    g: &'a ConvGeometry,
    taps: &'a [Tap],
    o: usize,
    x: &'a [f32],
    dy: &'a [f32],
    dw: &'a mut [f32],
    db: &'a mut [f32],
    /// Scratch: the `[k, b * p]` columns, the gathered `[o, b * p]` gradient, one phase-split
    /// image.
    col: &'a mut [f32],
    gathered: &'a mut [f32],
    buf: &'a mut [f32],
}

impl RowJob for BackwardWeightChunk<'_> {
    type Output = ();

    #[inline(always)]
    fn run<R: Rows>(self, rows: R) {
        let Self {
            g,
            taps,
            o,
            x,
            dy,
            dw,
            db,
            col,
            gathered,
            buf,
        } = self;
        let (il, k, p) = (g.image_len(), g.k(), g.p());
        let b = x.len() / il;
        let ld = b * p;
        unfold_images(rows, g, taps, x, col, buf);
        let dy_rows = channel_rows(rows, dy, b, o, p, gathered);
        // colᵀ: element (r, c) of the [b * p, k] matrix is col[c * ld + r].
        matmul(
            (o, k, ld),
            dw,
            k,
            true,
            View::rows(dy_rows, ld),
            View::cols(col, ld),
        );
        for (oc, s) in db.iter_mut().enumerate() {
            *s += rows::lane_sum(&dy_rows[oc * ld..(oc + 1) * ld]);
        }
    }
}

/// Convolution weight and bias gradients: `x [n, c, h, w]`, `dy [n, o, oh, ow]` ->
/// `(dW [o, c * kh * kw], db [o])`.
pub fn conv_backward_weight(
    g: &ConvGeometry,
    x: &[f32],
    dy: &[f32],
    o: usize,
) -> (Vec<f32>, Vec<f32>) {
    let (il, k, p) = (g.image_len(), g.k(), g.p());
    let n = x.len() / il.max(1);
    assert_eq!(x.len(), n * il, "conv_backward_weight: input length");
    assert_eq!(dy.len(), n * o * p, "conv_backward_weight: gradient length");
    let nb = g.chunk(n);
    let taps = taps(g);
    let xs: Vec<&[f32]> = x.chunks(nb * il).collect();
    let dys: Vec<&[f32]> = dy.chunks(nb * o * p).collect();
    ordered_sums([o * k, o], xs.len(), |chunk, [dw, db]| {
        let (x, dy) = (xs[chunk], dys[chunk]);
        let ld = x.len() / il * p;
        with_scratch([k * ld, o * ld, phased_len(g)], |col, gathered, buf| {
            rows::run(BackwardWeightChunk {
                g,
                taps: &taps,
                o,
                x,
                dy,
                dw,
                db,
                col,
                gathered,
                buf,
            })
        })
    })
}

/// Sums over `chunks` work items in parallel, each adding into two accumulators of `lens`
/// floats, with the same result on every run and any number of threads: the items go to a
/// fixed number of groups in order, each group sums its items in order, and the groups' partial
/// sums are added in order. (Rayon's `fold`/`reduce` splits work by stealing, which would change
/// the order of the float additions, and so the gradients, from run to run.)
fn ordered_sums(
    lens: [usize; 2],
    chunks: usize,
    add: impl Fn(usize, [&mut [f32]; 2]) + Sync,
) -> (Vec<f32>, Vec<f32>) {
    const GROUPS: usize = 8;
    let per_group = chunks.div_ceil(GROUPS).max(1);
    let partials: Vec<[Vec<f32>; 2]> = (0..chunks.div_ceil(per_group))
        .into_par_iter()
        .map(|group| {
            let mut acc = [vec![0.0f32; lens[0]], vec![0.0f32; lens[1]]];
            for chunk in group * per_group..((group + 1) * per_group).min(chunks) {
                let [a, b] = &mut acc;
                add(chunk, [a, b]);
            }
            acc
        })
        .collect();
    let mut total = [vec![0.0f32; lens[0]], vec![0.0f32; lens[1]]];
    for part in partials {
        for (t, p) in total.iter_mut().zip(part) {
            t.iter_mut().zip(p).for_each(|(x, y)| *x += y);
        }
    }
    let [a, b] = total;
    (a, b)
}

/// `weight [o, c, kh, kw]` -> `[c, o, kh, kw]` with both kernel axes reversed: the weight of the
/// swapped convolution ([`ConvGeometry::swapped`]). Its own inverse (with `o` and `c` exchanged).
pub fn swap_weight(weight: &[f32], o: usize, c: usize, kh: usize, kw: usize) -> Vec<f32> {
    let mut out = vec![0.0f32; weight.len()];
    for oc in 0..o {
        for ic in 0..c {
            for ki in 0..kh {
                for kj in 0..kw {
                    out[((ic * o + oc) * kh + kh - 1 - ki) * kw + kw - 1 - kj] =
                        weight[((oc * c + ic) * kh + ki) * kw + kj];
                }
            }
        }
    }
    out
}

/// Whether a convolution with `o` output channels is cheaper evaluated swapped: a stride-1
/// convolution with fewer output than input channels unfolds `o * kh * kw` rows instead of
/// `c * kh * kw` (the 32 -> 1 output layer of the VAE: 9 rows instead of 288).
pub fn prefers_swapped(g: &ConvGeometry, o: usize) -> Option<ConvGeometry> {
    if o < g.c {
        g.swapped(o)
    } else {
        None
    }
}

/// The gradient through a fused ReLU: `dy` where the layer's output `y` is positive, else 0.
pub fn relu_backward(dy: &[f32], y: &[f32]) -> Vec<f32> {
    struct Mask<'a>(&'a [f32], &'a [f32], &'a mut [f32]);
    impl RowJob for Mask<'_> {
        type Output = ();
        #[inline(always)]
        fn run<R: Rows>(self, _: R) {
            let Self(dy, y, out) = self;
            for ((o, d), y) in out.iter_mut().zip(dy).zip(y) {
                *o = if *y > 0.0 { *d } else { 0.0 };
            }
        }
    }
    assert_eq!(dy.len(), y.len(), "relu_backward: lengths");
    const CHUNK: usize = 65_536;
    par_build(dy.len(), CHUNK, |i, out| {
        let range = i * CHUNK..i * CHUNK + out.len();
        rows::run(Mask(&dy[range.clone()], &y[range], out))
    })
}

/// Per-channel sums of `dy [n, o, p]`: the bias gradient, `[o]`.
pub fn channel_sums(dy: &[f32], o: usize, p: usize) -> Vec<f32> {
    struct Sums<'a>(&'a [f32], usize, usize);
    impl RowJob for Sums<'_> {
        type Output = Vec<f32>;
        #[inline(always)]
        fn run<R: Rows>(self, _: R) -> Vec<f32> {
            let Self(dy, o, p) = self;
            let mut db = vec![0.0f32; o];
            for (i, plane) in dy.chunks(p.max(1)).enumerate() {
                db[i % o] += rows::lane_sum(plane);
            }
            db
        }
    }
    rows::run(Sums(dy, o, p))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn random(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
    }

    /// The definition, one multiply-add at a time.
    fn naive_forward(g: &ConvGeometry, x: &[f32], w: &[f32], o: usize) -> Vec<f32> {
        let n = x.len() / g.image_len();
        let mut y = vec![0.0f32; n * o * g.p()];
        for b in 0..n {
            for oc in 0..o {
                for oy in 0..g.oh {
                    for ox in 0..g.ow {
                        let mut s = 0.0f64;
                        for c in 0..g.c {
                            for ki in 0..g.kh {
                                for kj in 0..g.kw {
                                    let iy = (oy * g.stride[0] + ki) as i64 - g.padding[0] as i64;
                                    let ix = (ox * g.stride[1] + kj) as i64 - g.padding[1] as i64;
                                    if iy < 0 || ix < 0 || iy >= g.h as i64 || ix >= g.w as i64 {
                                        continue;
                                    }
                                    let xv = x[b * g.image_len()
                                        + (c * g.h + iy as usize) * g.w
                                        + ix as usize];
                                    let wv = w[((oc * g.c + c) * g.kh + ki) * g.kw + kj];
                                    s += (xv * wv) as f64;
                                }
                            }
                        }
                        y[((b * o + oc) * g.oh + oy) * g.ow + ox] = s as f32;
                    }
                }
            }
        }
        y
    }

    fn dot(a: &[f32], b: &[f32]) -> f64 {
        a.iter()
            .zip(b)
            .map(|(x, y)| (*x as f64) * (*y as f64))
            .sum()
    }

    fn close(a: &[f32], b: &[f32], tol: f32) {
        assert_eq!(a.len(), b.len());
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            assert!((x - y).abs() <= tol * (1.0 + y.abs()), "at {i}: {x} vs {y}");
        }
    }

    /// Geometries of the project's models (28x28 and 14x14 and 7x7 maps, 3x3 and 4x4 kernels,
    /// strides 1 and 2) and odd ones (rectangular, no padding, kernel larger than the padding).
    fn geometries() -> Vec<(ConvGeometry, usize)> {
        vec![
            (ConvGeometry::new([1, 28, 28], [3, 3], [1, 1], [1, 1]), 4),
            (ConvGeometry::new([3, 14, 14], [4, 4], [2, 2], [1, 1]), 5),
            (ConvGeometry::new([2, 7, 9], [3, 2], [2, 1], [0, 1]), 3),
            (ConvGeometry::new([4, 5, 5], [1, 1], [2, 2], [0, 0]), 2),
            (ConvGeometry::new([2, 6, 6], [5, 5], [1, 1], [2, 2]), 3),
        ]
    }

    #[test]
    fn forward_matches_the_definition() {
        for (i, (g, o)) in geometries().into_iter().enumerate() {
            for n in [1, 3, 37] {
                let x = random(n * g.image_len(), i as u64);
                let w = random(o * g.k(), 100 + i as u64);
                let bias = random(o, 200);
                let got = conv_forward(&g, &x, &w, Epilogue::bias(&bias), o);
                let mut want = naive_forward(&g, &x, &w, o);
                for (j, v) in want.iter_mut().enumerate() {
                    *v += bias[(j / g.p()) % o];
                }
                close(&got, &want, 1e-4);
            }
        }
    }

    #[test]
    fn epilogues_add_the_bias_then_apply_relu() {
        for (i, (g, o)) in geometries().into_iter().enumerate() {
            let n = 5;
            let x = random(n * g.image_len(), i as u64);
            let w = random(o * g.k(), 30 + i as u64);
            let dy = random(n * o * g.p(), 60 + i as u64);
            let bias_o = random(o, 7);
            let bias_c = random(g.c, 8);
            let relu = |v: Vec<f32>, bias: &[f32], plane: usize| -> Vec<f32> {
                let k = bias.len();
                v.iter()
                    .enumerate()
                    .map(|(j, v)| (v + bias[(j / plane) % k]).max(0.0))
                    .collect()
            };
            let fused = Epilogue {
                bias: Some(&bias_o),
                relu: true,
            };
            let plain = conv_forward(&g, &x, &w, Epilogue::NONE, o);
            let want = relu(plain, &bias_o, g.p());
            assert!(want.contains(&0.0) && want.iter().any(|v| *v > 0.0));
            close(&conv_forward(&g, &x, &w, fused, o), &want, 1e-5);
            let fused = Epilogue {
                bias: Some(&bias_c),
                relu: true,
            };
            let plain = conv_backward_data(&g, &dy, &w, o, Epilogue::NONE);
            let want = relu(plain, &bias_c, g.h * g.w);
            close(&conv_backward_data(&g, &dy, &w, o, fused), &want, 1e-5);
        }
        let y = [0.0, 2.0, -1.0, 0.5, 0.0];
        let dy = [1.0, 2.0, 3.0, 4.0, 5.0];
        assert_eq!(relu_backward(&dy, &y), vec![0.0, 2.0, 0.0, 4.0, 0.0]);
    }

    #[test]
    fn swapped_evaluation_matches_the_direct_one() {
        // A thin stride-1 convolution (32 -> 1 channels, as the VAE's output layer, and 5 -> 2
        // with a rectangular kernel) gives the same forward pass and gradients swapped.
        for (i, (g, o)) in [
            (ConvGeometry::new([32, 28, 28], [3, 3], [1, 1], [1, 1]), 1),
            (ConvGeometry::new([5, 9, 8], [3, 2], [1, 1], [1, 0]), 2),
        ]
        .into_iter()
        .enumerate()
        {
            let sw = prefers_swapped(&g, o).expect("thin stride-1 conv");
            let n = 7;
            let x = random(n * g.image_len(), i as u64);
            let w = random(o * g.k(), 10 + i as u64);
            let dy = random(n * o * g.p(), 20 + i as u64);
            let ws = swap_weight(&w, o, g.c, g.kh, g.kw);
            close(
                &conv_backward_data(&sw, &x, &ws, g.c, Epilogue::NONE),
                &conv_forward(&g, &x, &w, Epilogue::NONE, o),
                1e-4,
            );
            close(
                &conv_forward(&sw, &dy, &ws, Epilogue::NONE, g.c),
                &conv_backward_data(&g, &dy, &w, o, Epilogue::NONE),
                1e-4,
            );
            let (dws, _) = conv_backward_weight(&sw, &dy, &x, g.c);
            close(
                &swap_weight(&dws, g.c, o, g.kh, g.kw),
                &conv_backward_weight(&g, &x, &dy, o).0,
                1e-4,
            );
        }
    }

    #[test]
    fn backward_kernels_are_the_adjoints_of_forward() {
        // <conv(x, W), dy> = <x, dx(dy, W)> = <W, dW(x, dy)>: each gradient is the adjoint of the
        // forward map in one of its arguments; the bias gradient is the channel sum.
        for (i, (g, o)) in geometries().into_iter().enumerate() {
            let n = 19;
            let x = random(n * g.image_len(), i as u64);
            let w = random(o * g.k(), 50 + i as u64);
            let dy = random(n * o * g.p(), 90 + i as u64);
            let y = naive_forward(&g, &x, &w, o);
            let lhs = dot(&y, &dy);
            let dx = conv_backward_data(&g, &dy, &w, o, Epilogue::NONE);
            let (dw, db) = conv_backward_weight(&g, &x, &dy, o);
            let tol = 1e-4 * (1.0 + lhs.abs());
            assert!((dot(&x, &dx) - lhs).abs() < tol, "dx of geometry {i}");
            assert!((dot(&w, &dw) - lhs).abs() < tol, "dW of geometry {i}");
            close(&db, &channel_sums(&dy, o, g.p()), 1e-4);
        }
    }
}

#[cfg(test)]
mod timing {
    use super::*;
    use std::time::Instant;

    /// Milliseconds per call of each kernel on the reference VAE's layers, batch 256:
    /// `cargo test --release --lib kernel_timing -- --ignored --nocapture`.
    #[test]
    #[ignore = "timing, not a check"]
    fn kernel_timing() {
        let n = 256;
        let layers = [
            (
                "conv1 1->32 3x3",
                ConvGeometry::new([1, 28, 28], [3, 3], [1, 1], [1, 1]),
                32,
            ),
            (
                "conv2 32->64 4x4 s2",
                ConvGeometry::new([32, 28, 28], [4, 4], [2, 2], [1, 1]),
                64,
            ),
            (
                "conv3 64->128 4x4 s2",
                ConvGeometry::new([64, 14, 14], [4, 4], [2, 2], [1, 1]),
                128,
            ),
            (
                "out 32->1 3x3",
                ConvGeometry::new([32, 28, 28], [3, 3], [1, 1], [1, 1]),
                1,
            ),
        ];
        for (name, g, o) in layers {
            let x = vec![0.5f32; n * g.image_len()];
            let w = vec![0.01f32; o * g.k()];
            let dy = vec![0.1f32; n * o * g.p()];
            let time = |f: &dyn Fn()| {
                f();
                let t = Instant::now();
                for _ in 0..5 {
                    f();
                }
                t.elapsed().as_secs_f64() * 1000.0 / 5.0
            };
            let f = time(&|| {
                std::hint::black_box(conv_forward(&g, &x, &w, Epilogue::NONE, o));
            });
            let d = time(&|| {
                std::hint::black_box(conv_backward_data(&g, &dy, &w, o, Epilogue::NONE));
            });
            let wg = time(&|| {
                std::hint::black_box(conv_backward_weight(&g, &x, &dy, o));
            });
            let unfold = time(&|| {
                let mut phased = vec![0.0f32; phased_len(&g)];
                let mut col = vec![0.0f32; g.k() * g.p()];
                for i in 0..n {
                    let img = super::phased(
                        &g,
                        &x[i * g.image_len()..(i + 1) * g.image_len()],
                        &mut phased,
                    );
                    im2col(
                        super::rows::Portable,
                        &g,
                        &taps(&g),
                        img,
                        &mut col,
                        g.p(),
                        0,
                    );
                    std::hint::black_box(&col);
                }
            });
            println!("{name:24} im2col of {n} images on one thread: {unfold:.2} ms");
            let gmac = (n * o * g.k() * g.p()) as f64 / 1e9;
            println!(
                "{name:24} forward {f:7.2} ms  data {d:7.2} ms  weight {wg:7.2} ms   ({:.0} / {:.0} / {:.0} GFLOP/s)",
                2.0 * gmac / f * 1e3,
                2.0 * gmac / d * 1e3,
                2.0 * gmac / wg * 1e3
            );
        }
    }
}

#[cfg(test)]
mod peak {
    /// GFLOP/s of the matrix product alone, one thread and two:
    /// `cargo test --release --lib gemm_peak -- --ignored --nocapture`.
    #[test]
    #[ignore = "timing, not a check"]
    fn gemm_peak() {
        for (m, n, k) in [
            (1024, 1024, 1024),
            (128, 1568, 1024),
            (64, 1568, 512),
            (512, 1568, 64),
        ] {
            let a = vec![0.5f32; m * k];
            let b = vec![0.25f32; k * n];
            let mut c = vec![0.0f32; m * n];
            for par in [gemm::Parallelism::None, gemm::Parallelism::Rayon(2)] {
                let run = |c: &mut [f32]| unsafe {
                    gemm::gemm(
                        m,
                        n,
                        k,
                        c.as_mut_ptr(),
                        1,
                        n as isize,
                        false,
                        a.as_ptr(),
                        1,
                        k as isize,
                        b.as_ptr(),
                        1,
                        n as isize,
                        1.0f32,
                        1.0f32,
                        false,
                        false,
                        false,
                        par,
                    )
                };
                run(&mut c);
                let t = std::time::Instant::now();
                for _ in 0..10 {
                    run(&mut c);
                }
                let s = t.elapsed().as_secs_f64() / 10.0;
                println!(
                    "{m}x{n}x{k} {par:?}: {:.0} GFLOP/s",
                    2.0 * (m * n * k) as f64 / s / 1e9
                );
            }
        }
    }
}
