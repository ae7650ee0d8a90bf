//! Keeping the resident size to what the daemon uses.
//!
//! After a backlog the daemon has freed what it held for it (queues, batches, COPY
//! buffers, spooled transactions), but glibc keeps freed memory in its arenas for reuse:
//! the resident size stays at the backlog's peak. An operator reads that as the daemon's
//! size, so once idle after big work it is returned. And glibc gives each thread that
//! allocates concurrently an arena of its own (up to 8 per core): with a thread per
//! source, each holds on to its own high-water mark.

/// At most this many malloc arenas (glibc's `M_ARENA_MAX`), unless `MALLOC_ARENA_MAX`
/// says otherwise. Measured with 2: RSS after the 1M-row insert 11-17 MB instead of 39,
/// after 16 tenant databases 21 MB instead of 47-58, peaks of 16 tenants 54 MB instead
/// of 76-81, the same rates.
const ARENAS: i32 = 2;

/// Limits glibc's arenas (see [`ARENAS`]); call first thing, before any thread starts.
pub fn limit_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: mallopt has no preconditions; called before other threads exist.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, ARENAS);
        }
    }
}

/// Returns the allocator's free pages to the kernel (glibc `malloc_trim`); a no-op
/// elsewhere. Takes a few milliseconds: call it when idle, not per change.
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim has no preconditions; it only gives free pages back.
    unsafe {
        libc::malloc_trim(0);
    }
}
