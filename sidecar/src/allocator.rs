//! weir-proxy's global allocator: mimalloc 2, called through the entry points its fast paths sit
//! behind.
//!
//! A proxied request makes a few dozen small allocations (request and response heads, boxed
//! futures, header maps), so the allocator is on the hot path (callgrind,
//! `sidecar/benches/profile.sh`). Two choices, each measured there:
//!
//! - **Plain entry points for word alignment.** mimalloc's own `GlobalAlloc` (the `mimalloc`
//!   crate) passes every allocation to `mi_malloc_aligned`, whatever its alignment; mimalloc 3
//!   serves that from its fast path only when a free block of the size class is at hand, and
//!   otherwise over-allocates (size + alignment) every block whose size class is not a power of
//!   two: about 7 of the 37 allocations per request took that path and its slower free. Every
//!   mimalloc block is at least word-aligned (size classes are whole words, pages start
//!   16-aligned), so an alignment of a word or less, which is nearly every Rust allocation, goes
//!   to `mi_malloc`, `mi_zalloc` and `mi_realloc`; only larger ones to the aligned calls.
//! - **mimalloc 2 (the `v2` feature), not 3.** With 3, a change elsewhere that only moved a
//!   per-connection allocation to another size class made the proxy take a page from the arena
//!   and give it back about once per request (an emptied page is kept only while it is the last
//!   of its size class, and for a few slow-path allocations): 42 300 instructions per request
//!   instead of 39 600. With 2, 39 200 on the same source, and the same resident memory.
//!
//! Built without transparent huge pages (`no_thp`, Cargo.toml): with them mimalloc's arenas put
//! 2 MiB pages under a few live objects and the idle proxy's anonymous memory went from 2.2 to
//! 9.8 MiB.

// An allocator is unsafe by contract (`GlobalAlloc`); this module is the one place weir-proxy
// allows it.
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout};
use std::ffi::c_void;

use libmimalloc_sys as mi;

/// The largest alignment every mimalloc block has.
const WORD: usize = std::mem::size_of::<usize>();

/// mimalloc, with word-aligned layouts through its plain entry points.
pub struct Allocator;

// SAFETY: every method hands mimalloc a layout's size and, above a word, its alignment, and
// mimalloc returns blocks of at least that size and alignment (or null); `dealloc` and `realloc`
// get pointers this allocator returned, which `mi_free`/`mi_realloc*` accept whichever entry
// point allocated them. A block from `mi_realloc` keeps the word alignment of every block.
unsafe impl GlobalAlloc for Allocator {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        unsafe {
            if layout.align() <= WORD {
                mi::mi_malloc(layout.size()) as *mut u8
            } else {
                mi::mi_malloc_aligned(layout.size(), layout.align()) as *mut u8
            }
        }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        unsafe {
            if layout.align() <= WORD {
                mi::mi_zalloc(layout.size()) as *mut u8
            } else {
                mi::mi_zalloc_aligned(layout.size(), layout.align()) as *mut u8
            }
        }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        unsafe { mi::mi_free(ptr as *mut c_void) }
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        unsafe {
            if layout.align() <= WORD {
                mi::mi_realloc(ptr as *mut c_void, new_size) as *mut u8
            } else {
                mi::mi_realloc_aligned(ptr as *mut c_void, new_size, layout.align()) as *mut u8
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every size from 1 byte to 64 KiB in steps that cross mimalloc's size classes, at every
    /// alignment from 1 to 4096: the block is aligned, writable over its whole size, keeps its
    /// bytes through a realloc that grows it, and `alloc_zeroed` gives zeros. Blocks are held
    /// until the end so that pages fill up and the allocator's slower paths run too.
    #[test]
    fn blocks_are_aligned_sized_and_kept_through_realloc() {
        let a = Allocator;
        let mut held = Vec::new();
        let mut size = 1usize;
        while size <= 64 * 1024 {
            for shift in 0..=12 {
                let align = 1usize << shift;
                let layout = Layout::from_size_align(size, align).unwrap();
                for _ in 0..4 {
                    // SAFETY: a non-zero size; the block is written within its size only and
                    // freed with its layout (after the realloc, its new size).
                    unsafe {
                        let p = a.alloc(layout);
                        assert!(!p.is_null(), "alloc({size}, {align})");
                        assert_eq!(p as usize % align, 0, "alloc({size}, {align}) misaligned");
                        for i in 0..size {
                            p.add(i).write((i % 251) as u8);
                        }
                        let grown = size * 2 + 8;
                        let q = a.realloc(p, layout, grown);
                        assert!(!q.is_null(), "realloc({size} -> {grown}, {align})");
                        assert_eq!(q as usize % align, 0, "realloc({size}, {align}) misaligned");
                        for i in 0..size {
                            assert_eq!(q.add(i).read(), (i % 251) as u8, "byte {i} after realloc");
                        }
                        q.add(grown - 1).write(7);
                        held.push((q, Layout::from_size_align(grown, align).unwrap()));

                        let z = a.alloc_zeroed(layout);
                        assert!(!z.is_null());
                        assert_eq!(
                            z as usize % align,
                            0,
                            "alloc_zeroed({size}, {align}) misaligned"
                        );
                        assert!(
                            (0..size).all(|i| z.add(i).read() == 0),
                            "alloc_zeroed({size})"
                        );
                        held.push((z, layout));
                    }
                }
            }
            size = if size < 64 { size + 7 } else { size * 3 / 2 };
        }
        for (p, layout) in held {
            // SAFETY: each block once, with the layout it has.
            unsafe { a.dealloc(p, layout) }
        }
    }
}
