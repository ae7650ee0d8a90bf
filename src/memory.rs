//! Handing freed memory back to the system.
//!
//! After a backlog the daemon has freed what it held for it (queues, batches, COPY
//! buffers, spooled transactions), but glibc keeps freed memory in its per-thread arenas
//! for reuse: the resident size stays at the backlog's peak. An operator reads that as
//! the daemon's size, so once idle after big work it is returned.

/// Returns the allocator's free pages to the kernel (glibc `malloc_trim`); a no-op
/// elsewhere. Takes a few milliseconds: call it when idle, not per change.
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim has no preconditions; it only gives free pages back.
    unsafe {
        libc::malloc_trim(0);
    }
}
