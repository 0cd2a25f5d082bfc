//! Giving memory back. glibc's allocator keeps freed memory inside its arenas (it only trims the
//! top of the heap), so after a burst of flows a daemon stayed tens of MB above its baseline for
//! good (the hostile suite's flood-write case: intermediate 83 MB, connector 55 MB, 10 s after the
//! attacker left; 18 MB and 15 MB after a `malloc_trim`). Every daemon therefore trims its heap
//! every few seconds, on a blocking thread. Builds on other C libraries (musl's allocator unmaps
//! freed memory itself) do nothing here.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// How often the heap is trimmed.
pub const TRIM_EVERY: Duration = Duration::from_secs(5);

/// Returns freed heap memory to the system now; true if some was returned.
pub fn trim() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: malloc_trim only walks and releases the allocator's own free memory.
        unsafe { libc::malloc_trim(0) == 1 }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

/// Trims the heap every [`TRIM_EVERY`] until `stop`.
pub async fn trimmer(stop: CancellationToken) {
    let mut tick = tokio::time::interval(TRIM_EVERY);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {
                let _ = tokio::task::spawn_blocking(trim).await;
            }
        }
    }
}

#[cfg(all(test, target_os = "linux", target_env = "gnu"))]
mod tests {
    use super::*;

    /// After many small allocations are freed, a trim returns memory (RSS falls).
    #[test]
    fn trimming_returns_freed_memory() {
        fn rss_kb() -> u64 {
            std::fs::read_to_string("/proc/self/status")
                .ok()
                .and_then(|s| {
                    s.lines()
                        .find(|l| l.starts_with("VmRSS:"))
                        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
                })
                .unwrap_or(0)
        }
        // 200 MB in 16 KiB pieces (below the mmap threshold, so they live in the heap), then
        // free all but every 64th piece, which pins the heap's top so glibc cannot trim it.
        let mut keep = Vec::new();
        let mut pieces: Vec<Vec<u8>> = (0..12_800).map(|i| vec![i as u8; 16 * 1024]).collect();
        for (i, p) in pieces.drain(..).enumerate() {
            if i % 64 == 0 {
                keep.push(p);
            }
        }
        let before = rss_kb();
        trim();
        let after = rss_kb();
        assert!(
            after + 50_000 < before,
            "RSS {before} kB -> {after} kB after trim"
        );
        drop(keep);
    }
}
