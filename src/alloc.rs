//! The process allocator: mimalloc, called the way its own docs intend. The `mimalloc`
//! crate's `GlobalAlloc` passes every allocation through `mi_malloc_aligned`, whose generic
//! path cost tollgate ~8k instructions per proxied request (callgrind, benches/README.md);
//! for the alignments `mi_malloc` already guarantees, this calls `mi_malloc` (the fast path),
//! as the crate itself did before 0.1.40. Larger alignments (tokio's task cells) still go
//! through the aligned calls.

use libmimalloc_sys as mi;
use std::alloc::{GlobalAlloc, Layout};
use std::ffi::c_void;

/// Whether `mi_malloc` already gives this alignment: every mimalloc block is aligned to a
/// machine word, and a block of a multiple of 16 bytes comes from a size class that is itself
/// a multiple of 16 in a 16-aligned page area. Anything else takes the aligned call.
fn plain(align: usize, size: usize) -> bool {
    align <= std::mem::size_of::<usize>() || (align == 16 && size.is_multiple_of(16) && size > 0)
}

pub struct MiMalloc;

unsafe impl GlobalAlloc for MiMalloc {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if plain(layout.align(), layout.size()) {
            mi::mi_malloc(layout.size()) as *mut u8
        } else {
            mi::mi_malloc_aligned(layout.size(), layout.align()) as *mut u8
        }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if plain(layout.align(), layout.size()) {
            mi::mi_zalloc(layout.size()) as *mut u8
        } else {
            mi::mi_zalloc_aligned(layout.size(), layout.align()) as *mut u8
        }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        mi::mi_free(ptr as *mut c_void);
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if plain(layout.align(), new_size) {
            mi::mi_realloc(ptr as *mut c_void, new_size) as *mut u8
        } else {
            mi::mi_realloc_aligned(ptr as *mut c_void, new_size, layout.align()) as *mut u8
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_have_the_alignment_asked_for() {
        let a = MiMalloc;
        let mut cases = vec![
            (1, 1),
            (8, 8),
            (24, 8),
            (100, 4),
            (64, 64),
            (3000, 128),
            (8, 16),
        ];
        cases.extend((1..=300).map(|k| (16 * k, 16)));
        cases.extend([
            (16 << 10, 16),
            (64 << 10, 16),
            (1 << 20, 16),
            (24, 16),
            (40, 16),
        ]);
        for (size, align) in cases {
            let layout = Layout::from_size_align(size, align).unwrap();
            unsafe {
                let p = a.alloc(layout);
                assert!(!p.is_null());
                assert_eq!(p as usize % align, 0, "{size}/{align}");
                let p = a.realloc(p, layout, size * 3);
                assert_eq!(p as usize % align, 0, "realloc {size}/{align}");
                a.dealloc(p, Layout::from_size_align(size * 3, align).unwrap());
                let z = a.alloc_zeroed(layout);
                assert!(std::slice::from_raw_parts(z, size).iter().all(|b| *b == 0));
                a.dealloc(z, layout);
            }
        }
    }
}
