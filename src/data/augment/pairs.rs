//! SimCLR batches: two augmented views of each image, computed in parallel, optionally one batch
//! ahead on a background thread.

use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;
use std::thread::JoinHandle;

use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

use super::view::{augment_view_into, ViewAugmentConfig};
use crate::data::batch::{rng_for, stream};
use crate::data::{FashionMnist, IMAGE_SIDE};

const PIXELS: usize = IMAGE_SIDE * IMAGE_SIDE;

/// Largest batch [`view_pairs`] accepts: image `k` gets its own `2^24`-word stretch of the step's
/// `2^40`-word window of the RNG stream (see [`view_rng`]).
pub const MAX_VIEW_BATCH: usize = 1 << 16;

/// The generator of image `k` (its position in the batch) at global step `step`: both of its
/// views are drawn from it, view A first.
///
/// Why not `rng_for(seed, VIEWS, step * 65536 + k)`: `rng_for` puts counters `2^40` words apart,
/// and ChaCha's position wraps at `2^68` words, so counters repeat after `2^28`, which would be
/// step 4096 of such a scheme, well within a long run. Instead the step is the counter (distinct
/// up to step `2^28`) and image `k` starts `k * 2^24` words into that step's window. A view
/// draws a few dozen words, so the stretches never overlap. The generator depends only on
/// `(seed, step, k)`: not on threads, scheduling, or what ran before (resume).
pub fn view_rng(seed: u64, step: u64, k: usize) -> ChaCha8Rng {
    item_rng(seed, stream::VIEWS, step, k)
}

/// [`view_rng`] on another stream: the generator of image `k` of the batch of step `step`.
pub fn item_rng(seed: u64, stream: u64, step: u64, k: usize) -> ChaCha8Rng {
    assert!(
        k < MAX_VIEW_BATCH,
        "batches have at most {MAX_VIEW_BATCH} images"
    );
    let mut rng = rng_for(seed, stream, step);
    let base = rng.get_word_pos();
    rng.set_word_pos(base + ((k as u128) << 24));
    rng
}

/// Two augmented views of each image `data.image(indices[k])`, as row-major `[n, 784]` buffers
/// (`n = indices.len()`, view A and view B; reshape to `[n, 1, 28, 28]`), values in [0, 1].
///
/// Images are spread over rayon's current pool; image `k` draws from [`view_rng`]`(seed, step, k)`,
/// so the result is the same for any number of threads and after a resume at `step`.
pub fn view_pairs(
    data: &FashionMnist,
    indices: &[usize],
    cfg: &ViewAugmentConfig,
    seed: u64,
    step: u64,
) -> (Vec<f32>, Vec<f32>) {
    assert!(
        indices.len() <= MAX_VIEW_BATCH,
        "batches have at most {MAX_VIEW_BATCH} images"
    );
    let n = indices.len();
    let mut a = vec![0.0f32; n * PIXELS];
    let mut b = vec![0.0f32; n * PIXELS];
    a.par_chunks_mut(PIXELS)
        .zip(b.par_chunks_mut(PIXELS))
        .zip(indices.par_iter())
        .enumerate()
        // One image is a few microseconds of work: hand out at least 8 at a time so rayon's
        // splitting does not cost more than the work.
        .with_min_len(8)
        .for_each(|(k, ((va, vb), &i))| {
            let mut rng = view_rng(seed, step, k);
            let image = data.image(i);
            augment_view_into(image, cfg, &mut rng, va);
            augment_view_into(image, cfg, &mut rng, vb);
        });
    (a, b)
}

/// One prepared batch: `(step, views)`, the views of [`view_pairs`] in one `[2n, 784]` buffer,
/// view A of every image first, then view B: the layout the training step feeds to the encoder.
pub type ViewBatch = (u64, Vec<f32>);

/// Prepares SimCLR batches on a background thread while the current one trains.
///
/// The thread walks the planned `(step, indices)` batches in order, computes [`view_pairs`] for
/// each and queues them; at most [`Prefetcher::DEPTH`] finished batches wait in the queue (plus
/// one in the making), which bounds memory at about `(DEPTH + 1) * 2 * n * 784 * 4` bytes.
/// Iterating yields the batches in plan order and ends after the last. Dropping it early stops
/// the thread (after the batch it is computing, if any) and waits for it. A panic on the thread
/// is raised again from `next`.
pub struct Prefetcher {
    rx: Option<Receiver<ViewBatch>>,
    worker: Option<JoinHandle<()>>,
}

impl Prefetcher {
    /// Finished batches that may wait in the queue.
    pub const DEPTH: usize = 2;

    /// Starts the thread on the plan `batches`: `(global step, image indices)` pairs, in the
    /// order training will ask for them (any iterator that can move to a thread, e.g. a `Vec`).
    pub fn start<I>(data: Arc<FashionMnist>, cfg: ViewAugmentConfig, seed: u64, batches: I) -> Self
    where
        I: IntoIterator<Item = (u64, Vec<usize>)>,
        I::IntoIter: Send + 'static,
    {
        let (tx, rx) = sync_channel(Self::DEPTH);
        let plan = batches.into_iter();
        let worker = std::thread::Builder::new()
            .name("simclr-views".into())
            .spawn(move || {
                for (step, indices) in plan {
                    let (mut views, b) = view_pairs(&data, &indices, &cfg, seed, step);
                    // Joined here, off the training thread.
                    views.extend_from_slice(&b);
                    if tx.send((step, views)).is_err() {
                        // The consumer is gone (dropped early): stop instead of working for no one.
                        break;
                    }
                }
            })
            .expect("cannot start the SimCLR view thread");
        Self {
            rx: Some(rx),
            worker: Some(worker),
        }
    }
}

impl Iterator for Prefetcher {
    type Item = ViewBatch;

    /// The next planned batch, waiting for it if it is not ready; `None` after the last.
    fn next(&mut self) -> Option<ViewBatch> {
        let batch = self.rx.as_ref()?.recv();
        match batch {
            Ok(batch) => Some(batch),
            Err(_) => {
                // The sender is gone: the plan is done, or the thread panicked. Tell them apart,
                // so that a bug there does not pass for a short epoch.
                self.rx = None;
                if let Some(worker) = self.worker.take() {
                    if let Err(panic) = worker.join() {
                        std::panic::resume_unwind(panic);
                    }
                }
                None
            }
        }
    }
}

impl Drop for Prefetcher {
    fn drop(&mut self) {
        // Dropping the receiver first makes a send that is blocked on a full queue, or the next
        // one, fail, so the thread leaves its loop and the join cannot hang.
        drop(self.rx.take());
        if let Some(worker) = self.worker.take() {
            // A panic there is not raised again here: drop may run while unwinding already.
            let _ = worker.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use rand::Rng;

    use super::*;
    use crate::data::augment::augment_view;
    use crate::data::augment::view::everything_on;

    /// `n` synthetic images: a bright rectangle of random size and place on a dark noisy ground.
    fn synthetic(n: usize, seed: u64) -> FashionMnist {
        let mut rng = rng_for(seed, 99, 0);
        let mut pixels = Vec::with_capacity(n * PIXELS);
        for _ in 0..n {
            let (x0, y0) = (rng.random_range(0..10), rng.random_range(0..10));
            let (x1, y1) = (rng.random_range(16..28), rng.random_range(16..28));
            for y in 0..IMAGE_SIDE {
                for x in 0..IMAGE_SIDE {
                    let inside = (x0..x1).contains(&x) && (y0..y1).contains(&y);
                    pixels.push(if inside {
                        rng.random_range(120..=255)
                    } else {
                        rng.random_range(0..20)
                    });
                }
            }
        }
        FashionMnist::from_pixels(pixels).unwrap()
    }

    fn in_pool<T: Send>(threads: usize, f: impl FnOnce() -> T + Send) -> T {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap()
            .install(f)
    }

    #[test]
    fn pairs_have_the_shape_range_and_the_documented_generators() {
        let data = synthetic(50, 1);
        let indices = [3, 0, 49, 3, 17];
        for cfg in [ViewAugmentConfig::default(), everything_on()] {
            let (a, b) = view_pairs(&data, &indices, &cfg, 11, 7);
            assert_eq!((a.len(), b.len()), (5 * PIXELS, 5 * PIXELS));
            assert!(a.iter().chain(&b).all(|v| (0.0..=1.0).contains(v)));
            for (k, &i) in indices.iter().enumerate() {
                let mut rng = view_rng(11, 7, k);
                let va = augment_view(data.image(i), &cfg, &mut rng);
                let vb = augment_view(data.image(i), &cfg, &mut rng);
                assert_eq!(&a[k * PIXELS..][..PIXELS], &va[..]);
                assert_eq!(&b[k * PIXELS..][..PIXELS], &vb[..]);
                assert_ne!(va, vb, "the two views of an image differ");
            }
            // The same image twice in a batch gets different views (k differs).
            assert_ne!(&a[..PIXELS], &a[3 * PIXELS..][..PIXELS]);
        }
        assert!(view_pairs(&data, &[], &everything_on(), 1, 0).0.is_empty());
    }

    #[test]
    fn pairs_depend_on_seed_and_step_only() {
        let data = synthetic(300, 2);
        let indices: Vec<usize> = (0..300).rev().collect();
        let cfg = ViewAugmentConfig::default();
        let x = view_pairs(&data, &indices, &cfg, 5, 12);
        assert_eq!(x, view_pairs(&data, &indices, &cfg, 5, 12));
        assert_ne!(x.0, view_pairs(&data, &indices, &cfg, 5, 13).0);
        assert_ne!(x.0, view_pairs(&data, &indices, &cfg, 6, 12).0);
        // Steps 2^12 apart would share generators under a `step * 65536 + k` counter.
        assert_ne!(x.0, view_pairs(&data, &indices, &cfg, 5, 12 + 4096).0);
        let one = in_pool(1, || view_pairs(&data, &indices, &cfg, 5, 12));
        let two = in_pool(2, || view_pairs(&data, &indices, &cfg, 5, 12));
        let four = in_pool(4, || view_pairs(&data, &indices, &cfg, 5, 12));
        assert!(
            one == x && two == x && four == x,
            "thread count changed the views"
        );
    }

    fn plan(batches: usize, size: usize, n: usize) -> Vec<(u64, Vec<usize>)> {
        (0..batches)
            .map(|s| {
                let step = 100 + s as u64;
                (step, (0..size).map(|k| (k * 7 + s * 3) % n).collect())
            })
            .collect()
    }

    #[test]
    fn prefetcher_yields_the_plan_in_order() {
        let data = Arc::new(synthetic(64, 3));
        let cfg = everything_on();
        let batches = plan(6, 32, 64);
        let mut pre = Prefetcher::start(data.clone(), cfg.clone(), 9, batches.clone());
        for (step, indices) in &batches {
            let (s, views) = pre.next().expect("a planned batch is missing");
            assert_eq!(s, *step);
            let (a, b) = view_pairs(&data, indices, &cfg, 9, *step);
            assert_eq!(views, [a, b].concat());
        }
        assert!(pre.next().is_none());
        assert!(pre.next().is_none(), "stays finished");
        let empty = Prefetcher::start(data, cfg, 9, Vec::new());
        assert_eq!(empty.count(), 0);
    }

    /// Runs `f` on a thread and fails if it does not finish within 20 s (instead of hanging).
    fn finishes(f: impl FnOnce() + Send + 'static) {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            f();
            let _ = tx.send(());
        });
        rx.recv_timeout(Duration::from_secs(20))
            .expect("dropping the prefetcher hung");
    }

    #[test]
    fn dropping_the_prefetcher_early_stops_its_thread() {
        let data = Arc::new(synthetic(64, 4));
        let d = data.clone();
        // Queue full and the thread blocked in send, then dropped.
        finishes(move || {
            let mut pre = Prefetcher::start(d, ViewAugmentConfig::default(), 1, plan(1000, 64, 64));
            assert!(pre.next().is_some());
            std::thread::sleep(Duration::from_millis(100));
            drop(pre);
        });
        // Dropped before the first batch is asked for.
        finishes(move || {
            drop(Prefetcher::start(
                data,
                ViewAugmentConfig::default(),
                1,
                plan(1000, 64, 64),
            ))
        });
    }

    #[test]
    fn a_panic_on_the_thread_reaches_the_consumer() {
        let data = Arc::new(synthetic(8, 5));
        // Index 8 is out of range: the thread panics on the second batch.
        let batches = vec![(0, vec![0, 1]), (1, vec![8])];
        let mut pre = Prefetcher::start(data, ViewAugmentConfig::default(), 1, batches);
        assert!(pre.next().is_some());
        let second = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| pre.next()));
        assert!(second.is_err());
    }

    /// `cargo test --release --lib view_pairs_timing -- --ignored --nocapture`
    #[test]
    #[ignore = "timing; run by hand"]
    fn view_pairs_timing() {
        let data = synthetic(4096, 6);
        let indices: Vec<usize> = (0..512).map(|k| (k * 2654435761usize) % 4096).collect();
        for (name, cfg) in [
            ("defaults", ViewAugmentConfig::default()),
            ("all on", everything_on()),
        ] {
            for threads in [1, 2] {
                let per_batch = in_pool(threads, || {
                    view_pairs(&data, &indices, &cfg, 1, 0); // warm-up
                    let reps = 40;
                    let t = Instant::now();
                    for step in 0..reps {
                        std::hint::black_box(view_pairs(&data, &indices, &cfg, 1, step));
                    }
                    t.elapsed().as_secs_f64() * 1000.0 / reps as f64
                });
                println!("view_pairs, {name}, 512 pairs, {threads} thread(s): {per_batch:.2} ms per batch");
            }
        }
    }
}
