//! Allocator settings shared by the `locus` and `locus-server` binaries
//! (both use mimalloc as the global allocator).

/// `mi_option_purge_decommits` in mimalloc v3's option enum (its sixth
/// member; libmimalloc-sys 0.1.49 has no constant for it).
const MI_OPTION_PURGE_DECOMMITS: libmimalloc_sys::mi_option_t = 5;

/// Makes mimalloc give freed memory back with `MADV_FREE` instead of
/// decommitting it. The data path frees and allocates large buffers all
/// the time (quinn's receive batches, aligned write buffers): with
/// decommits, every new one faulted fresh pages in and the kernel zeroed
/// them, about 35,000 page faults and a tenth of a chunk server's CPU per
/// GiB written. Memory freed this way is still taken back by the kernel
/// under pressure. Call first thing in `main`.
pub fn tune_allocator() {
    // SAFETY: plain calls into the linked mimalloc; the option index is
    // only used with the major version it belongs to.
    unsafe {
        if (30_000..40_000).contains(&libmimalloc_sys::mi_version()) {
            libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DECOMMITS, 0);
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_purge_option_is_the_one_set() {
        super::tune_allocator();
        // SAFETY: as in `tune_allocator`.
        let (version, value) = unsafe {
            (libmimalloc_sys::mi_version(), libmimalloc_sys::mi_option_get(super::MI_OPTION_PURGE_DECOMMITS))
        };
        assert!((30_000..40_000).contains(&version), "mimalloc {version}: check the option index for this version");
        assert_eq!(value, 0);
    }
}
