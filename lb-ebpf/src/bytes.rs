//! Copies and zeroing the compiler cannot turn into calls to memcpy, memmove or memset.
//! Those are functions of their own in the object, and a call to one adds a frame to the
//! stack as older kernels' verifiers count it (Linux 6.1 rounds every frame, even an
//! empty one, up to 32 bytes, and allows 512 in all), which the XDP program cannot spare.

/// Copies `N` bytes from `src` to `dst`, first to last: the ranges may overlap only when
/// `dst` comes before `src`.
#[inline(always)]
pub unsafe fn copy<const N: usize>(dst: *mut u8, src: *const u8) {
    let mut i = 0;
    while i < N {
        dst.add(i).write_volatile(src.add(i).read_volatile());
        i += 1;
    }
}

/// Zeroes a `T` whose size is a multiple of 4 and that is 4-aligned.
#[inline(always)]
pub unsafe fn zero<T>(dst: *mut T) {
    let words = dst.cast::<u32>();
    let mut i = 0;
    while i < core::mem::size_of::<T>() / 4 {
        words.add(i).write_volatile(0);
        i += 1;
    }
}
