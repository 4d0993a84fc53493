//! Allocator settings shared by the `locus` and `locus-server` binaries
//! (both use mimalloc as the global allocator).

/// `mi_option_purge_decommits` in mimalloc v3's option enum (its sixth
/// member; libmimalloc-sys 0.1.49 has no constant for it).
const MI_OPTION_PURGE_DECOMMITS: libmimalloc_sys::mi_option_t = 5;
/// `mi_option_purge_delay` (milliseconds), the sixteenth member.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// How long freed memory stays with the process before mimalloc gives it
/// back. Under a steady write load (NBD 4 KiB random writes, `rss.sh`-style
/// counts of a chunk server's minor faults) mimalloc's default of 1 s still
/// gave back and faulted in again about 500 (huge) pages a second, a tenth
/// of a chunk server's CPU spent zeroing them; at 10 s it was a few dozen
/// in a whole run. Memory idle that long still goes back.
const PURGE_DELAY_MS: std::ffi::c_long = 10_000;

/// Makes mimalloc give freed memory back with `MADV_FREE` instead of
/// decommitting it. The data path frees and allocates large buffers all
/// the time (quinn's receive batches, aligned write buffers): with
/// decommits, every new one faulted fresh pages in and the kernel zeroed
/// them, about 35,000 page faults and a tenth of a chunk server's CPU per
/// GiB written. Memory freed this way is still taken back by the kernel
/// under pressure. And keeps freed memory [`PURGE_DELAY_MS`] before giving
/// it back at all. Call first thing in `main`.
pub fn tune_allocator() {
    // SAFETY: plain calls into the linked mimalloc; the option index is
    // only used with the major version it belongs to.
    unsafe {
        if (30_000..40_000).contains(&libmimalloc_sys::mi_version()) {
            libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DECOMMITS, 0);
            libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, PURGE_DELAY_MS);
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_purge_option_is_the_one_set() {
        super::tune_allocator();
        // SAFETY: as in `tune_allocator`.
        let (version, decommits, delay) = unsafe {
            (
                libmimalloc_sys::mi_version(),
                libmimalloc_sys::mi_option_get(super::MI_OPTION_PURGE_DECOMMITS),
                libmimalloc_sys::mi_option_get(super::MI_OPTION_PURGE_DELAY),
            )
        };
        assert!((30_000..40_000).contains(&version), "mimalloc {version}: check the option index for this version");
        assert_eq!(decommits, 0);
        assert_eq!(delay, super::PURGE_DELAY_MS);
    }
}
