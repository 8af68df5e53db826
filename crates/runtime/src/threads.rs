//! The CPU thread count: physical cores by default (SMT siblings share one core's SIMD units, so
//! a second thread per core adds contention, not throughput), never more than the process may
//! use (affinity masks, cgroup quotas).

use std::collections::HashSet;

/// Physical cores this process can use: distinct (package, core) pairs among the online CPUs
/// (Linux sysfs), capped by `available_parallelism`; `available_parallelism` alone elsewhere.
pub fn default_threads() -> usize {
    let logical = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    physical_cores().map_or(logical, |p| p.clamp(1, logical))
}

fn physical_cores() -> Option<usize> {
    let dir = std::fs::read_dir("/sys/devices/system/cpu").ok()?;
    let mut cores = HashSet::new();
    for e in dir.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(n) = name.strip_prefix("cpu") else {
            continue;
        };
        if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let topo = e.path().join("topology");
        let read = |f: &str| std::fs::read_to_string(topo.join(f)).ok();
        let (Some(core), Some(pkg)) = (read("core_id"), read("physical_package_id")) else {
            continue;
        };
        cores.insert((pkg.trim().to_string(), core.trim().to_string()));
    }
    (!cores.is_empty()).then_some(cores.len())
}

/// `requested` threads, capped at the `available` logical CPUs (more only fight over the same
/// cores: 4096 threads on 2 cores ran for minutes at a load average over 1,000); the warning
/// to show when it was capped.
pub fn cap(requested: usize, available: usize) -> (usize, Option<String>) {
    if requested > available {
        let warning = format!(
            "--threads {requested} is more than the {available} CPUs this process may use; using {available}"
        );
        (available, Some(warning))
    } else {
        (requested, None)
    }
}

/// Sizes the process's compute pool: `threads` if given, else [`default_threads`]. rayon and
/// candle both read `RAYON_NUM_THREADS` when their pools start, so call this before any
/// compute (and before other threads start); an explicit `RAYON_NUM_THREADS` in the
/// environment wins over the default.
///
/// It also keeps candle's second pool from starting: candle runs large element-wise ops on a
/// pool of its own (`candle-bp-*`, sized by `CANDLE_NUM_THREADS`, else like rayon's) whose
/// threads spin for about a millisecond after every op. Next to rayon's pool that is one
/// spinning thread more than there are cores, and it steals the core from the next matrix
/// product (LoRA training on 2 cores ran at less than half speed). With `CANDLE_NUM_THREADS=1`
/// those ops run on the calling thread, which is already one of rayon's. An explicit
/// `CANDLE_NUM_THREADS` wins.
pub fn configure(threads: Option<usize>) -> usize {
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
    let n = match threads {
        Some(t) => t,
        None => match std::env::var("RAYON_NUM_THREADS")
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
        {
            Some(t) if t > 0 => return t,
            _ => default_threads(),
        },
    };
    std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    n
}

/// Makes glibc's malloc use one arena for the whole process, unless `MALLOC_ARENA_MAX` is set
/// (glibc has applied it already). With one arena per thread, buffers that a rayon worker
/// allocates and another thread frees are not reused across arenas: LoRA training's peak RSS
/// then lands on about 645 or about 1030 MiB from run to run (SmolLM2, batch 4), against a
/// steady 607 MiB with one arena, at the same speed. Call it before threads start. A no-op
/// outside glibc.
pub fn single_malloc_arena() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: mallopt only changes an allocator setting; it is called before other
        // threads allocate.
        #[allow(unsafe_code)]
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thread_requests_are_capped_at_the_cpus_with_a_warning() {
        assert_eq!(cap(2, 8), (2, None));
        assert_eq!(cap(8, 8), (8, None));
        let (n, w) = cap(4096, 2);
        assert_eq!(n, 2);
        assert!(w.unwrap().contains("4096"));
    }

    #[test]
    fn the_default_is_at_least_one_and_at_most_the_logical_cpus() {
        let logical = std::thread::available_parallelism().unwrap().get();
        let d = default_threads();
        assert!((1..=logical).contains(&d), "{d} of {logical}");
    }
}
