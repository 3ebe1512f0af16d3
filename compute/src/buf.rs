//! Typed, 64-byte-aligned array storage shared by every graph and vector in Quiver.
//!
//! A [`Segment<T>`] is an immutable slice of plain-old-data values that lives either on the heap
//! (in an allocation aligned to 64 bytes), in a memory-mapped file, or in a buffer that the
//! transport filled straight from the network. Kernels only ever see `&[T]`, so where the bytes
//! came from never matters to them, and no array is ever decoded or copied to be read.
//!
//! This module owns the only `unsafe` that reinterprets bytes as typed slices; everything else in
//! the crate goes through [`Segment`] and [`AlignedBytes`].

use std::alloc::{self, Layout};
use std::fmt;
use std::marker::PhantomData;
use std::ops::Deref;
use std::ptr::NonNull;
use std::sync::Arc;

/// Alignment of every array segment, in memory and in files and frames.
pub const SEGMENT_ALIGN: usize = 64;

mod sealed {
    pub trait Sealed {}
}

/// Plain-old-data element types that may be viewed from raw little-endian bytes.
///
/// Sealed: only types for which every bit pattern is a valid value are implemented.
pub trait Pod: sealed::Sealed + Copy + Send + Sync + 'static {
    /// Name used in error messages and `.npy` descriptors.
    const NAME: &'static str;
}

macro_rules! pod {
    ($($t:ty => $name:literal),*) => {$(
        impl sealed::Sealed for $t {}
        impl Pod for $t { const NAME: &'static str = $name; }
    )*};
}
pod!(u8 => "u8", u32 => "u32", u64 => "u64", f32 => "f32", f64 => "f64");

/// A heap allocation of bytes aligned to [`SEGMENT_ALIGN`], zero-initialised.
///
/// The receive path of the transport copies QUIC chunks into one of these exactly once; the
/// result is then frozen into [`Segment`]s that kernels read in place.
pub struct AlignedBytes {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: `AlignedBytes` owns its allocation exclusively, like `Vec<u8>`.
unsafe impl Send for AlignedBytes {}
// SAFETY: shared access only hands out `&[u8]`, like `Vec<u8>`.
unsafe impl Sync for AlignedBytes {}

impl AlignedBytes {
    /// Allocates `len` zeroed bytes aligned to 64 bytes.
    ///
    /// Large buffers ask the kernel for transparent huge pages, which measurably speeds up the
    /// random access of diffusion kernels (see DESIGN.md, The compute core).
    pub fn zeroed(len: usize) -> Self {
        if len == 0 {
            // A well-aligned dangling pointer: valid for zero-length slices of any `Pod` type.
            let ptr = NonNull::new(std::ptr::without_provenance_mut(SEGMENT_ALIGN)).expect("non-null");
            return Self { ptr, len: 0 };
        }
        let layout = Layout::from_size_align(len, SEGMENT_ALIGN).expect("allocation size overflows isize");
        // Advise before the first write: `alloc_zeroed` with 64-byte alignment is `posix_memalign`
        // plus a memset, which would fault every page in as a small page before the advice.
        // SAFETY: `layout` has non-zero size.
        let raw = unsafe { alloc::alloc(layout) };
        let Some(ptr) = NonNull::new(raw) else { alloc::handle_alloc_error(layout) };
        advise_huge_pages(ptr.as_ptr(), len);
        // SAFETY: `ptr` is valid for writes of `len` bytes (just allocated with this layout).
        unsafe { std::ptr::write_bytes(ptr.as_ptr(), 0, len) };
        Self { ptr, len }
    }

    /// Number of bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the buffer holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: `ptr` is valid for `len` initialised bytes (zeroed at allocation) or dangling with len 0.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    /// The bytes, mutably.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_slice`, and `&mut self` guarantees exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }

    /// Views the buffer as a mutable slice of `T` (the length must be a multiple of `size_of::<T>()`).
    pub fn as_mut_typed<T: Pod>(&mut self) -> &mut [T] {
        let size = std::mem::size_of::<T>();
        assert!(self.len.is_multiple_of(size), "buffer of {} bytes is not a whole number of {}", self.len, T::NAME);
        // SAFETY: the allocation is 64-byte aligned (≥ align_of::<T>()), initialised, exclusively
        // borrowed, and every bit pattern is a valid `T` (sealed `Pod`).
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr().cast::<T>(), self.len / size) }
    }
}

impl Drop for AlignedBytes {
    fn drop(&mut self) {
        if self.len != 0 {
            let layout = Layout::from_size_align(self.len, SEGMENT_ALIGN).expect("layout was valid at allocation");
            // SAFETY: allocated in `zeroed` with this exact layout.
            unsafe { alloc::dealloc(self.ptr.as_ptr(), layout) };
        }
    }
}

impl fmt::Debug for AlignedBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AlignedBytes").field("len", &self.len).finish()
    }
}

#[cfg(target_os = "linux")]
fn advise_huge_pages(ptr: *mut u8, len: usize) {
    const HUGE: usize = 2 << 20;
    if len >= HUGE {
        // Only whole 2 MiB pages inside the allocation can be huge; advise that part.
        let start = (ptr as usize).next_multiple_of(HUGE);
        let end = (ptr as usize + len) & !(HUGE - 1);
        if end > start {
            // SAFETY: the range lies inside our own allocation; madvise only changes paging hints.
            unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE) };
        }
    }
}

#[cfg(not(target_os = "linux"))]
fn advise_huge_pages(_ptr: *mut u8, _len: usize) {}

/// Where a segment's bytes live.
pub enum Storage {
    /// A 64-byte-aligned heap allocation (built in memory or filled from the network).
    Heap(AlignedBytes),
    /// A read-only memory map of a file.
    Mapped(memmap2::Mmap),
    /// `f32` values moved in from a vector without a copy (a kernel's buffer handed over).
    Floats(Vec<f32>),
}

impl Storage {
    fn bytes(&self) -> &[u8] {
        match self {
            Storage::Heap(b) => b.as_slice(),
            Storage::Mapped(m) => m,
            // SAFETY: any initialised f32 is 4 initialised bytes; u8 has no alignment needs.
            Storage::Floats(v) => unsafe { std::slice::from_raw_parts(v.as_ptr().cast::<u8>(), size_of_val(&v[..])) },
        }
    }
}

impl fmt::Debug for Storage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Storage::Heap(b) => write!(f, "Heap({} bytes)", b.len()),
            Storage::Mapped(m) => write!(f, "Mapped({} bytes)", m.len()),
            Storage::Floats(v) => write!(f, "Floats({} values)", v.len()),
        }
    }
}

/// Why bytes could not be viewed as a typed segment.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SegmentError {
    #[error("segment at byte {offset} is not {align}-byte aligned")]
    Misaligned { offset: usize, align: usize },
    #[error("segment of {count} × {ty} at byte {offset} runs past the end of {available} bytes")]
    OutOfBounds { offset: usize, count: usize, ty: &'static str, available: usize },
}

/// An immutable, cheaply clonable, typed view of `len` values of `T` inside shared [`Storage`].
pub struct Segment<T: Pod> {
    storage: Arc<Storage>,
    offset: usize,
    len: usize,
    _t: PhantomData<T>,
}

impl<T: Pod> Clone for Segment<T> {
    fn clone(&self) -> Self {
        Self { storage: Arc::clone(&self.storage), offset: self.offset, len: self.len, _t: PhantomData }
    }
}

impl<T: Pod> Segment<T> {
    /// Views `count` values of `T` starting `offset` bytes into `storage`, checking bounds and alignment.
    pub fn view(storage: Arc<Storage>, offset: usize, count: usize) -> Result<Self, SegmentError> {
        let available = storage.bytes().len();
        let size = std::mem::size_of::<T>();
        let fits = count.checked_mul(size).and_then(|b| b.checked_add(offset)).is_some_and(|end| end <= available);
        if !fits {
            return Err(SegmentError::OutOfBounds { offset, count, ty: T::NAME, available });
        }
        let addr = storage.bytes().as_ptr() as usize + offset;
        if count > 0 && !addr.is_multiple_of(std::mem::align_of::<T>()) {
            return Err(SegmentError::Misaligned { offset, align: std::mem::align_of::<T>() });
        }
        Ok(Self { storage, offset, len: count, _t: PhantomData })
    }

    /// Takes ownership of a vector's values, copying them once into aligned storage.
    pub fn from_slice(values: &[T]) -> Self {
        let bytes = std::mem::size_of_val(values);
        let mut buf = AlignedBytes::zeroed(bytes);
        buf.as_mut_typed::<T>().copy_from_slice(values);
        Self::from_aligned(buf)
    }

    /// Freezes a whole aligned buffer into a segment (no copy).
    pub fn from_aligned(buf: AlignedBytes) -> Self {
        let count = buf.len() / std::mem::size_of::<T>();
        Self::view(Arc::new(Storage::Heap(buf)), 0, count).expect("an aligned buffer always holds its own length")
    }

    /// Builds a segment of `len` values by filling an aligned buffer in place.
    pub fn build(len: usize, fill: impl FnOnce(&mut [T])) -> Self {
        let mut buf = AlignedBytes::zeroed(len * std::mem::size_of::<T>());
        fill(buf.as_mut_typed::<T>());
        Self::from_aligned(buf)
    }

    /// A sub-range of this segment sharing its storage (no copy).
    ///
    /// # Panics
    /// If `range` is not within `0..self.len()`.
    pub fn slice(&self, range: std::ops::Range<usize>) -> Self {
        assert!(range.start <= range.end && range.end <= self.len, "slice {range:?} of a {}-element segment", self.len);
        Self {
            storage: Arc::clone(&self.storage),
            offset: self.offset + range.start * std::mem::size_of::<T>(),
            len: range.end - range.start,
            _t: PhantomData,
        }
    }

    /// The storage this segment points into (for zero-copy sends and tests of identity).
    pub fn storage(&self) -> &Arc<Storage> {
        &self.storage
    }

    /// The segment's bytes, little-endian, exactly as stored.
    pub fn as_bytes(&self) -> &[u8] {
        &self.storage.bytes()[self.offset..self.offset + self.len * std::mem::size_of::<T>()]
    }
}

impl Segment<f32> {
    /// Takes a vector's values as a segment without copying them.
    pub fn from_floats(values: Vec<f32>) -> Self {
        let count = values.len();
        Self::view(Arc::new(Storage::Floats(values)), 0, count).expect("a vector is aligned for its own type")
    }
}

impl<T: Pod> Deref for Segment<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        if self.len == 0 {
            return &[];
        }
        // SAFETY: `view` checked that `offset + len * size_of::<T>()` lies inside the storage and
        // that the start is aligned for `T`; the storage is immutable while shared and lives as long
        // as `self` holds the `Arc`; every bit pattern is a valid `T` (sealed `Pod`).
        unsafe { std::slice::from_raw_parts(self.storage.bytes().as_ptr().add(self.offset).cast::<T>(), self.len) }
    }
}

impl<T: Pod + fmt::Debug> fmt::Debug for Segment<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Segment").field("ty", &T::NAME).field("len", &self.len).field("storage", &self.storage).finish()
    }
}

impl<T: Pod + PartialEq> PartialEq for Segment<T> {
    fn eq(&self, other: &Self) -> bool {
        **self == **other
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_and_round_trips() {
        let s = Segment::from_slice(&[1u32, 2, 3]);
        assert_eq!(&*s, &[1, 2, 3]);
        assert_eq!(s.as_bytes().as_ptr() as usize % SEGMENT_ALIGN, 0);
    }

    #[test]
    fn view_checks_bounds_and_alignment() {
        let storage = Arc::new(Storage::Heap(AlignedBytes::zeroed(64)));
        assert!(Segment::<u64>::view(storage.clone(), 0, 8).is_ok());
        assert!(matches!(Segment::<u64>::view(storage.clone(), 8, 8), Err(SegmentError::OutOfBounds { .. })));
        assert!(matches!(Segment::<u64>::view(storage.clone(), 4, 1), Err(SegmentError::Misaligned { .. })));
        assert!(matches!(Segment::<u64>::view(storage, usize::MAX, 2), Err(SegmentError::OutOfBounds { .. })));
    }

    #[test]
    fn empty_segments_are_fine() {
        let s = Segment::<f32>::from_slice(&[]);
        assert!(s.is_empty());
    }
}
