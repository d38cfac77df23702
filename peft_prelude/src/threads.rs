//! The process's thread and allocator settings, decided once, before candle's first op.
//!
//! * candle's CPU matmul asks for its thread count on every call, and unless
//!   `RAYON_NUM_THREADS` is set that means reading and parsing `/proc/cpuinfo` (physical
//!   cores) each time. Setting the variable took SmolLM2 Q4_1 decoding from 102 to 146
//!   tokens/s, i.e. ~3 ms per token, or ~50 µs for each of the ~60 matmuls a token makes
//!   (derived from those two figures, not timed per call).
//!   [`settle_thread_count`] computes candle's own default once and publishes it through that
//!   variable, so nothing changes but the repeated probing.
//! * candle runs its elementwise ops on a second pool of its own whose workers spin after each
//!   op (25,000 spins) before parking, while our kernels and gemm run on rayon: on a training
//!   step the spinning worker took ~9% of the CPU from rayon's threads. Our hot elementwise
//!   work runs in our own kernels, so candle's pool gets no extra workers
//!   (`CANDLE_NUM_THREADS=1`: its ops run on the calling thread): +6-20% tokens/s on a 2-core
//!   SmolLM2 step, decoding unchanged.
//! * glibc's `malloc` serves each activation of a few MB (a 512-token prefill's projection
//!   outputs, 1-3 MB) from a fresh `mmap` and gives the top of its heap back to the system as
//!   soon as 128 KB there are free, so every such buffer is faulted in page by page again:
//!   page faults and zeroing were ~5% of an f32 prefill. [`tune_allocator`] keeps blocks up to
//!   64 MB on the heap and lets up to 512 MB stay free at its top before trimming (the peak
//!   RSS a step reaches is unchanged; memory freed after it stays with the process for the
//!   next step): 512-token f32 prompt 757-765 -> 818-853 tokens/s.
//!
//!   One arena for all threads: a training step runs on a pool worker (see
//!   [`on_pool_with_spinning_helpers`]) and its activations are freed where they were not
//!   allocated; with an arena per thread that spread the step over several arenas' heaps
//!   (peak RSS of the f32 SmolLM2 step 1.45 -> 2.24-2.30 GB); with one, 1.45 GB. The few
//!   large allocations a step makes do not contend for its lock measurably.
//!
//! A value the user set for any of these variables (`MALLOC_MMAP_THRESHOLD_`,
//! `MALLOC_TRIM_THRESHOLD_`, `MALLOC_ARENA_MAX` for the allocator) is kept.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Once;

static SETTLED: Once = Once::new();

/// Sets `RAYON_NUM_THREADS` to candle's default thread count and `CANDLE_NUM_THREADS` to 1
/// where the variables are not already set (a user's choice is kept). Called by the loaders
/// and [`crate::model::Model::new`]; cheap after the first call.
///
/// The variable is written while other threads may exist (rayon's workers), as
/// `std::env::set_var` warns against; they do not read the environment, and this runs at
/// model construction, before any of candle's matmuls of that model.
pub fn settle_thread_count() {
    SETTLED.call_once(|| {
        let user_set = std::env::var("RAYON_NUM_THREADS")
            .ok()
            .and_then(|s| s.parse::<usize>().ok())
            .is_some_and(|n| n > 0);
        if !user_set {
            let n = candle_core::utils::get_num_threads().max(1);
            std::env::set_var("RAYON_NUM_THREADS", n.to_string());
        }
        if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
            std::env::set_var("CANDLE_NUM_THREADS", "1");
        }
        tune_allocator();
    });
}

/// glibc only: larger `mmap` and trim thresholds for `malloc` and a single arena (module
/// notes), each unless the user set it through its environment variable.
fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        const MMAP_THRESHOLD: libc::c_int = 64 << 20;
        const TRIM_THRESHOLD: libc::c_int = 512 << 20;
        let user_set = ["MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"]
            .iter()
            .any(|v| std::env::var_os(v).is_some());
        // SAFETY (both blocks): mallopt only changes the allocator's parameters and is
        // thread-safe.
        if !user_set {
            unsafe {
                libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
                libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD);
            }
        }
        if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
            unsafe {
                libc::mallopt(libc::M_ARENA_MAX, 1);
            }
        }
    }
}

/// Runs `f` on a worker of rayon's pool while the other workers, instead of going to sleep
/// between `f`'s parallel loops, wait for its tasks spinning (they run whatever tasks appear,
/// `f`'s or anyone's, and stop when `f` returns).
///
/// Decoding one token runs ~200 short parallel loops (one per matvec) separated by
/// single-threaded work; an idle rayon worker parks after a few dozen yields, so each loop
/// paid a futex wake-up: scheduler and wake-up code were ~15% of a Q4_1 decoding profile.
/// llama.cpp's thread pool spins between operations for the same reason.
///
/// `f` runs inline in a `join` whose other half is the first spinner, so that half is queued
/// behind `f` on `f`'s worker for another worker to take (a spinner queued ahead of `f` would
/// run `f` nested inside its own loop, on the same worker, and help nobody). Further spinners,
/// for pools of more than two threads, are detached tasks that nobody waits for. A spinner
/// that finds itself on the worker running `f` (taken up while `f` waits inside one of its
/// loops) stops at once, so no worker waits for a spinner that waits for it.
pub fn on_pool_with_spinning_helpers<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    struct State {
        done: AtomicBool,
        owner: AtomicUsize,
    }
    const NOBODY: usize = usize::MAX;
    impl State {
        fn spin(&self) {
            let here = rayon::current_thread_index().unwrap_or(NOBODY);
            while !self.done.load(Ordering::Acquire) && self.owner.load(Ordering::Acquire) != here {
                if rayon::yield_now() != Some(rayon::Yield::Executed) {
                    std::hint::spin_loop();
                }
            }
        }
    }
    /// Ends the spinning however `f` ends (a panic included).
    struct Finish<'a>(&'a State);
    impl Drop for Finish<'_> {
        fn drop(&mut self) {
            self.0.done.store(true, Ordering::Release);
        }
    }
    let state = std::sync::Arc::new(State {
        done: AtomicBool::new(false),
        owner: AtomicUsize::new(NOBODY),
    });
    let run = || {
        let _finish = Finish(&state);
        state.owner.store(
            rayon::current_thread_index().unwrap_or(NOBODY),
            Ordering::Release,
        );
        for _ in 2..rayon::current_num_threads() {
            let state = state.clone();
            rayon::spawn(move || state.spin());
        }
        f()
    };
    rayon::join(run, || state.spin()).0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_thread_count_is_published_once_and_positive() {
        settle_thread_count();
        let n: usize = std::env::var("RAYON_NUM_THREADS").unwrap().parse().unwrap();
        assert!(n >= 1);
        assert_eq!(candle_core::utils::get_num_threads(), n);
        assert!(std::env::var("CANDLE_NUM_THREADS").is_ok_and(|v| !v.is_empty()));
    }

    #[test]
    fn spinning_helpers_run_the_loops_and_stop() {
        use rayon::prelude::*;
        for round in 0..200u64 {
            let (sum, on_pool) = on_pool_with_spinning_helpers(|| {
                let sum: u64 = (0..1000u64).into_par_iter().map(|i| i * round).sum();
                (sum, rayon::current_thread_index().is_some())
            });
            assert_eq!(sum, 499_500 * round);
            assert!(on_pool, "f ran off the pool");
        }
        // A panic in f reaches the caller and the helpers still stop: the pool serves the
        // next call.
        let caught = std::panic::catch_unwind(|| on_pool_with_spinning_helpers(|| panic!("f")));
        assert!(caught.is_err());
        let sum: u64 = on_pool_with_spinning_helpers(|| (0..10u64).into_par_iter().sum());
        assert_eq!(sum, 45);
    }
}
