//! Request buffers: 4 KiB-aligned (so `O_DIRECT` can use them as they are), in power-of-two size
//! classes, recycled per worker thread so the hot path allocates nothing once warm.

use std::alloc::{Layout, alloc_zeroed, dealloc};
use std::ptr::NonNull;

/// Alignment of every buffer: enough for `O_DIRECT` on 4Kn devices.
pub const BUF_ALIGN: usize = 4096;
const MIN_CLASS_SHIFT: u32 = 12;
const CLASSES: usize = 16; // 4 KiB .. 128 MiB

/// One heap buffer, owned by a request until its reply is sent.
pub struct Buf {
    ptr: NonNull<u8>,
    cap: usize,
}

// SAFETY: `Buf` uniquely owns its allocation (no aliasing handles exist), like a `Box<[u8]>`.
unsafe impl Send for Buf {}

impl Buf {
    fn new(cap: usize) -> Buf {
        let layout =
            Layout::from_size_align(cap, BUF_ALIGN).expect("buffer classes are valid layouts");
        // SAFETY: `layout` has a nonzero size (the smallest class is 4 KiB).
        let ptr = unsafe { alloc_zeroed(layout) };
        let ptr = NonNull::new(ptr).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        Buf { ptr, cap }
    }

    pub fn capacity(&self) -> usize {
        self.cap
    }

    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    pub fn as_ptr(&self) -> *const u8 {
        self.ptr.as_ptr()
    }

    pub fn slice(&self, start: usize, len: usize) -> &[u8] {
        assert!(
            start + len <= self.cap,
            "slice {start}+{len} beyond buffer of {}",
            self.cap
        );
        // SAFETY: the allocation is `cap` bytes, initialised (zeroed at allocation, and only ever
        // written with bytes since), and `&self` keeps it alive and unaliased by mutable borrows.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr().add(start), len) }
    }

    pub fn slice_mut(&mut self, start: usize, len: usize) -> &mut [u8] {
        assert!(
            start + len <= self.cap,
            "slice {start}+{len} beyond buffer of {}",
            self.cap
        );
        // SAFETY: as in `slice`, and `&mut self` guarantees exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr().add(start), len) }
    }
}

impl Drop for Buf {
    fn drop(&mut self) {
        let layout =
            Layout::from_size_align(self.cap, BUF_ALIGN).expect("layout was valid at allocation");
        // SAFETY: `ptr` came from `alloc_zeroed` with this same layout and is freed only here.
        unsafe { dealloc(self.ptr.as_ptr(), layout) }
    }
}

/// Free lists per size class, bounded in the bytes they keep.
pub struct BufPool {
    free: Vec<Vec<Buf>>,
    cached_bytes: usize,
    max_cached_bytes: usize,
}

impl BufPool {
    pub fn new(max_cached_bytes: usize) -> BufPool {
        BufPool {
            free: (0..CLASSES).map(|_| Vec::new()).collect(),
            cached_bytes: 0,
            max_cached_bytes,
        }
    }

    fn class_of(len: usize) -> usize {
        let shift = len
            .max(1)
            .next_power_of_two()
            .trailing_zeros()
            .max(MIN_CLASS_SHIFT);
        (shift - MIN_CLASS_SHIFT) as usize
    }

    /// A buffer of at least `len` bytes (`len` at most the largest class).
    pub fn get(&mut self, len: usize) -> Buf {
        let class = Self::class_of(len);
        assert!(
            class < CLASSES,
            "buffer of {len} bytes exceeds the largest class"
        );
        match self.free[class].pop() {
            Some(b) => {
                self.cached_bytes -= b.cap;
                b
            }
            None => Buf::new(1 << (class as u32 + MIN_CLASS_SHIFT)),
        }
    }

    pub fn put(&mut self, buf: Buf) {
        if self.cached_bytes + buf.cap > self.max_cached_bytes {
            return; // dropped: frees the memory
        }
        self.cached_bytes += buf.cap;
        self.free[Self::class_of(buf.cap)].push(buf);
    }

    /// Largest request a pool buffer can hold.
    pub const MAX_BYTES: usize = 1 << (CLASSES as u32 - 1 + MIN_CLASS_SHIFT);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_aligned_reused_and_bounded() {
        let mut pool = BufPool::new(64 * 1024);
        let b = pool.get(5000);
        assert_eq!(b.capacity(), 8192);
        assert_eq!(b.as_ptr() as usize % BUF_ALIGN, 0);
        let p = b.as_ptr();
        pool.put(b);
        let b = pool.get(8192);
        assert_eq!(b.as_ptr(), p, "a freed buffer of the class is reused");
        pool.put(b);
        let big = pool.get(1 << 20);
        pool.put(big); // over the cache bound: freed, not kept
        assert_eq!(pool.cached_bytes, 8192);
        assert_eq!(BufPool::class_of(1), 0);
        assert_eq!(BufPool::class_of(4097), 1);
    }
}
