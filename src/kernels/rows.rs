//! Row operations of the convolution kernels' unfold and fold loops, in two builds: AVX-512
//! (masked 16-lane loads and stores) and portable.
//!
//! The rows these loops move are short (7, 14 or 28 floats for the project's 7x7, 14x14 and 28x28
//! maps): a `memcpy` call per row costs more than the copy, and the zero padding at each end
//! costs two more calls. With AVX-512 a row of up to 16 floats, padding included, is one masked
//! load and one masked store.
//!
//! [`run`] runs a [`RowJob`] with the best build the CPU supports: the AVX-512 build is a
//! `#[target_feature]` function into which the job and the row operations are inlined, so the
//! job's other loops (phase splits, reorders, bias adds) are vectorised with 512-bit vectors too.

/// The row operations; a value of the type is the proof that the CPU can run them.
pub(crate) trait Rows: Copy {
    /// `d[..lo] = 0`, `d[lo..lo + s.len()] = s`, the rest of `d` = 0. Needs
    /// `lo + s.len() <= d.len()`.
    fn place(self, d: &mut [f32], lo: usize, s: &[f32]);
    /// `d += s` (equal lengths).
    fn add(self, d: &mut [f32], s: &[f32]);
    /// `d = s` (equal lengths).
    fn copy(self, d: &mut [f32], s: &[f32]);
    /// `d = 0`.
    fn zero(self, d: &mut [f32]);

    /// [`Rows::place`] on `count` rows: row `r` of `d` (rows of `w` floats, back to back) gets
    /// `s[r * stride..][..len]` at offset `lo`.
    #[inline(always)]
    fn place_rows(self, d: &mut [f32], w: usize, lo: usize, s: &[f32], stride: usize, len: usize) {
        for (r, row) in d.chunks_exact_mut(w).enumerate() {
            self.place(row, lo, &s[r * stride..r * stride + len]);
        }
    }

    /// The adjoint of [`Rows::place_rows`]: `s[r * stride..][..len] += d`-row `r` from offset
    /// `lo`, for each row `r` of `d` (rows of `w` floats).
    #[inline(always)]
    fn add_rows(self, s: &mut [f32], stride: usize, len: usize, d: &[f32], w: usize, lo: usize) {
        for (r, row) in d.chunks_exact(w).enumerate() {
            self.add(&mut s[r * stride..r * stride + len], &row[lo..lo + len]);
        }
    }
}

/// Work that runs with some [`Rows`]: one chunk of images of a kernel.
pub(crate) trait RowJob {
    type Output;
    fn run<R: Rows>(self, rows: R) -> Self::Output;
}

/// Runs `job` with AVX-512 row operations where the CPU has them, else portable ones.
#[inline(always)]
pub(crate) fn run<J: RowJob>(job: J) -> J::Output {
    #[cfg(target_arch = "x86_64")]
    if let Some(rows) = Avx512::detect() {
        #[target_feature(enable = "avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,bmi2")]
        unsafe fn avx512<J: RowJob>(job: J, rows: Avx512) -> J::Output {
            job.run(rows)
        }
        // SAFETY: `rows` exists, so the CPU has every feature the function is compiled for.
        return unsafe { avx512(job, rows) };
    }
    job.run(Portable)
}

/// The sum of `s` as 16 interleaved partial sums, added in order at the end: vectorised (one
/// 512-bit register in the AVX-512 build) where a plain left-to-right sum is one scalar add per
/// float, and the same on every run.
#[inline(always)]
pub(crate) fn lane_sum(s: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let blocks = s.chunks_exact(16);
    let rest = blocks.remainder();
    for b in blocks {
        for (a, v) in acc.iter_mut().zip(b) {
            *a += v;
        }
    }
    for (a, v) in acc.iter_mut().zip(rest) {
        *a += v;
    }
    acc.iter().sum()
}

/// Plain slice operations, for any CPU.
#[derive(Clone, Copy)]
pub(crate) struct Portable;

impl Rows for Portable {
    #[inline(always)]
    fn place(self, d: &mut [f32], lo: usize, s: &[f32]) {
        let hi = lo + s.len();
        d[..lo].fill(0.0);
        d[lo..hi].copy_from_slice(s);
        d[hi..].fill(0.0);
    }

    #[inline(always)]
    fn add(self, d: &mut [f32], s: &[f32]) {
        for (a, b) in d.iter_mut().zip(s) {
            *a += b;
        }
    }

    #[inline(always)]
    fn copy(self, d: &mut [f32], s: &[f32]) {
        d.copy_from_slice(s);
    }

    #[inline(always)]
    fn zero(self, d: &mut [f32]) {
        d.fill(0.0);
    }
}

/// AVX-512 masked loads and stores, 16 lanes at a time. Only [`Avx512::detect`] makes one.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
pub(crate) struct Avx512(());

#[cfg(target_arch = "x86_64")]
impl Avx512 {
    fn detect() -> Option<Self> {
        let has = std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512vl")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512dq")
            && std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
            && std::arch::is_x86_feature_detected!("bmi2");
        has.then_some(Self(()))
    }
}

/// The lanes `l` of a 16-lane block with `from <= l < to`.
#[inline(always)]
fn lanes(from: isize, to: isize) -> u16 {
    let (a, b) = (from.clamp(0, 16) as u32, to.clamp(0, 16) as u32);
    if b <= a {
        0
    } else {
        ((1u32 << b) - (1u32 << a)) as u16
    }
}

#[cfg(target_arch = "x86_64")]
impl Rows for Avx512 {
    #[inline(always)]
    fn place(self, d: &mut [f32], lo: usize, s: &[f32]) {
        use std::arch::x86_64::{_mm512_mask_storeu_ps, _mm512_maskz_loadu_ps};
        let (n, hi) = (d.len(), lo + s.len());
        assert!(hi <= n, "place: row too long");
        let mut base = 0;
        while base < n {
            let store = lanes(0, (n - base) as isize);
            let load = lanes(lo as isize - base as isize, hi as isize - base as isize);
            // SAFETY: the CPU has AVX-512F (`self` exists). The loaded lanes `l` have
            // `lo <= base + l < hi`, so they read `s[base + l - lo]`, inside `s`; masked-off
            // lanes are not accessed, so the block's start may lie outside `s`. The stored lanes
            // have `base + l < n`, inside `d`.
            unsafe {
                let src = s.as_ptr().wrapping_add(base).wrapping_sub(lo);
                let v = _mm512_maskz_loadu_ps(load, src);
                _mm512_mask_storeu_ps(d.as_mut_ptr().add(base), store, v);
            }
            base += 16;
        }
    }

    #[inline(always)]
    fn add(self, d: &mut [f32], s: &[f32]) {
        use std::arch::x86_64::{_mm512_add_ps, _mm512_mask_storeu_ps, _mm512_maskz_loadu_ps};
        let n = d.len();
        assert_eq!(n, s.len(), "add: lengths");
        let mut base = 0;
        while base < n {
            let m = lanes(0, (n - base) as isize);
            // SAFETY: AVX-512F (`self` exists); the lanes of `m` index `base + l < n`, inside
            // both slices.
            unsafe {
                let a = _mm512_maskz_loadu_ps(m, d.as_ptr().add(base));
                let b = _mm512_maskz_loadu_ps(m, s.as_ptr().add(base));
                _mm512_mask_storeu_ps(d.as_mut_ptr().add(base), m, _mm512_add_ps(a, b));
            }
            base += 16;
        }
    }

    #[inline(always)]
    fn copy(self, d: &mut [f32], s: &[f32]) {
        use std::arch::x86_64::{_mm512_mask_storeu_ps, _mm512_maskz_loadu_ps};
        let n = d.len();
        assert_eq!(n, s.len(), "copy: lengths");
        let mut base = 0;
        while base < n {
            let m = lanes(0, (n - base) as isize);
            // SAFETY: as in `add`.
            unsafe {
                let v = _mm512_maskz_loadu_ps(m, s.as_ptr().add(base));
                _mm512_mask_storeu_ps(d.as_mut_ptr().add(base), m, v);
            }
            base += 16;
        }
    }

    #[inline(always)]
    fn place_rows(self, d: &mut [f32], w: usize, lo: usize, s: &[f32], stride: usize, len: usize) {
        use std::arch::x86_64::{_mm512_mask_storeu_ps, _mm512_maskz_loadu_ps};
        if w > 16 || w == 0 {
            for (r, row) in d.chunks_exact_mut(w.max(1)).enumerate() {
                self.place(row, lo, &s[r * stride..r * stride + len]);
            }
            return;
        }
        // One block per row: the masks are the same for every row.
        let count = d.len() / w;
        assert!(lo + len <= w, "place_rows: row too long");
        if count == 0 {
            return;
        }
        assert!(
            (count - 1) * stride + len <= s.len(),
            "place_rows: source too short"
        );
        let (store, load) = (
            lanes(0, w as isize),
            lanes(lo as isize, (lo + len) as isize),
        );
        for r in 0..count {
            // SAFETY: AVX-512F (`self` exists). Loaded lanes `l` (`lo <= l < lo + len`) read
            // `s[r * stride + l - lo]`, inside `s` by the assert; stored lanes (`l < w`) write
            // `d[r * w + l]`, inside `d` since `r < count = d.len() / w`.
            unsafe {
                let src = s.as_ptr().wrapping_add(r * stride).wrapping_sub(lo);
                let v = _mm512_maskz_loadu_ps(load, src);
                _mm512_mask_storeu_ps(d.as_mut_ptr().add(r * w), store, v);
            }
        }
    }

    #[inline(always)]
    fn add_rows(self, s: &mut [f32], stride: usize, len: usize, d: &[f32], w: usize, lo: usize) {
        use std::arch::x86_64::{_mm512_add_ps, _mm512_mask_storeu_ps, _mm512_maskz_loadu_ps};
        if len > 16 || w == 0 {
            for (r, row) in d.chunks_exact(w.max(1)).enumerate() {
                self.add(&mut s[r * stride..r * stride + len], &row[lo..lo + len]);
            }
            return;
        }
        let count = d.len() / w;
        assert!(lo + len <= w, "add_rows: row too long");
        if count == 0 {
            return;
        }
        assert!(
            (count - 1) * stride + len <= s.len(),
            "add_rows: target too short"
        );
        let m = lanes(0, len as isize);
        for r in 0..count {
            // SAFETY: AVX-512F (`self` exists). The lanes `l < len` index `s[r * stride + l]`,
            // inside `s` by the assert, and `d[r * w + lo + l]`, inside row `r` of `d`.
            unsafe {
                let t = s.as_mut_ptr().add(r * stride);
                let a = _mm512_maskz_loadu_ps(m, t);
                let b = _mm512_maskz_loadu_ps(m, d.as_ptr().add(r * w + lo));
                _mm512_mask_storeu_ps(t, m, _mm512_add_ps(a, b));
            }
        }
    }

    #[inline(always)]
    fn zero(self, d: &mut [f32]) {
        use std::arch::x86_64::{_mm512_mask_storeu_ps, _mm512_setzero_ps};
        let n = d.len();
        let mut base = 0;
        while base < n {
            let m = lanes(0, (n - base) as isize);
            // SAFETY: as in `add`.
            unsafe { _mm512_mask_storeu_ps(d.as_mut_ptr().add(base), m, _mm512_setzero_ps()) };
            base += 16;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every operation of `rows` against the definition, on lengths around the 16-lane block
    /// (0 to 40) and every offset.
    fn check<R: Rows>(rows: R) {
        let src: Vec<f32> = (0..44).map(|i| i as f32 + 0.5).collect();
        for n in 0..=40 {
            for lo in 0..=n {
                for len in [0, 1, n - lo] {
                    let len = len.min(n - lo);
                    let mut d = vec![f32::NAN; n];
                    rows.place(&mut d, lo, &src[3..3 + len]);
                    let want: Vec<f32> = (0..n)
                        .map(|i| {
                            if i >= lo && i < lo + len {
                                src[3 + i - lo]
                            } else {
                                0.0
                            }
                        })
                        .collect();
                    assert_eq!(d, want, "place n={n} lo={lo} len={len}");
                }
            }
            let mut d: Vec<f32> = (0..n).map(|i| i as f32).collect();
            rows.add(&mut d, &src[..n]);
            assert!(d
                .iter()
                .enumerate()
                .all(|(i, v)| *v == 2.0 * i as f32 + 0.5));
            rows.copy(&mut d, &src[..n]);
            assert_eq!(d, &src[..n]);
            rows.zero(&mut d);
            assert!(d.iter().all(|v| *v == 0.0));
        }
        // Several rows at once, against one row at a time.
        let long: Vec<f32> = (0..400).map(|i| i as f32 * 0.25).collect();
        for w in [1, 5, 7, 14, 16, 17, 28] {
            for count in [0, 1, 3, 7] {
                for lo in 0..w {
                    for len in [0, 1, w - lo] {
                        let stride = w + 3;
                        let mut got = vec![f32::NAN; count * w];
                        rows.place_rows(&mut got, w, lo, &long, stride, len);
                        let mut want = vec![f32::NAN; count * w];
                        for r in 0..count {
                            let s = &long[r * stride..r * stride + len];
                            rows.place(&mut want[r * w..(r + 1) * w], lo, s);
                        }
                        assert_eq!(got, want, "place_rows w={w} count={count} lo={lo}");
                        let mut got = long.clone();
                        rows.add_rows(&mut got, stride, len, &want, w, lo);
                        let mut sum = long.clone();
                        for r in 0..count {
                            for l in 0..len {
                                sum[r * stride + l] += want[r * w + lo + l];
                            }
                        }
                        assert_eq!(got, sum, "add_rows w={w} count={count} lo={lo}");
                    }
                }
            }
        }
    }

    #[test]
    fn portable_rows_follow_the_definition() {
        check(Portable);
    }

    #[test]
    fn avx512_rows_follow_the_definition() {
        #[cfg(target_arch = "x86_64")]
        match Avx512::detect() {
            // The job runs inside the AVX-512 build, as the kernels do.
            Some(_) => {
                struct Check;
                impl RowJob for Check {
                    type Output = ();
                    fn run<R: Rows>(self, rows: R) {
                        check(rows)
                    }
                }
                run(Check)
            }
            None => eprintln!("no AVX-512 on this CPU: only the portable rows are checked"),
        }
    }

    #[test]
    fn lane_sum_is_the_sum() {
        for n in [0, 1, 15, 16, 17, 49, 196, 1000] {
            let s: Vec<f32> = (0..n).map(|i| (i % 7) as f32 - 2.5).collect();
            let want: f64 = s.iter().map(|v| *v as f64).sum();
            assert!((lane_sum(&s) as f64 - want).abs() < 1e-3, "n={n}");
        }
    }

    #[test]
    fn lanes_are_the_range_clamped_to_the_block() {
        assert_eq!(lanes(0, 16), 0xffff);
        assert_eq!(lanes(0, 3), 0b111);
        assert_eq!(lanes(-5, 2), 0b11);
        assert_eq!(lanes(14, 40), 0xc000);
        assert_eq!(lanes(5, 5), 0);
        assert_eq!(lanes(9, 3), 0);
        assert_eq!(lanes(20, 30), 0);
    }
}
