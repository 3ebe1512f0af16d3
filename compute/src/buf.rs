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

/// The memory of `values` as bytes, in the host's byte order (little-endian on every host that
/// reads and writes Quiver's files and frames).
pub fn pod_bytes<T: Pod>(values: &[T]) -> &[u8] {
    // SAFETY: a `Pod` value is initialised bytes without padding (the sealed impls are plain
    // integers and floats); `u8` has no alignment needs, and the view borrows `values`.
    unsafe { std::slice::from_raw_parts(values.as_ptr().cast::<u8>(), size_of_val(values)) }
}

/// A heap allocation of bytes aligned to [`SEGMENT_ALIGN`], zero-initialised.
///
/// The receive path of the transport copies QUIC chunks into one of these exactly once; the
/// result is then frozen into [`Segment`]s that kernels read in place.
pub struct AlignedBytes {
    ptr: NonNull<u8>,
    len: usize,
    /// Large buffers are their own anonymous mapping, shared with a [`Prefault`] that may still
    /// be faulting pages in; small ones come from the global allocator.
    mapping: Option<Arc<Mapping>>,
}

// SAFETY: `AlignedBytes` owns its bytes exclusively, like `Vec<u8>`; a `Prefault` sharing the
// mapping never reads or writes them (it only asks the kernel to back them).
unsafe impl Send for AlignedBytes {}
// SAFETY: shared access only hands out `&[u8]`, like `Vec<u8>`.
unsafe impl Sync for AlignedBytes {}

/// Buffers from this size up are mapped directly (see [`AlignedBytes::zeroed`]).
const MAPPED_FROM: usize = HUGE_PAGE;
const HUGE_PAGE: usize = 2 << 20;
/// The base page: the unit the kernel backs, releases and reports residency in.
const PAGE: usize = 4096;

impl AlignedBytes {
    /// Allocates `len` zeroed bytes aligned to 64 bytes.
    ///
    /// Buffers of 2 MiB and more are an anonymous mapping aligned to 2 MiB and advised for
    /// transparent huge pages, which measurably speeds up the random access of diffusion kernels
    /// (see DESIGN.md, The compute core). The kernel hands them out zeroed and backs each page on
    /// first touch, so allocating is cheap and nothing is written twice; [`Self::prefault`] backs
    /// them ahead of a writer on another thread.
    pub fn zeroed(len: usize) -> Self {
        if len == 0 {
            // A well-aligned dangling pointer: valid for zero-length slices of any `Pod` type.
            let ptr = NonNull::new(std::ptr::without_provenance_mut(SEGMENT_ALIGN)).expect("non-null");
            return Self { ptr, len: 0, mapping: None };
        }
        if len >= MAPPED_FROM
            && let Some(mapping) = Mapping::new(len)
        {
            return Self { ptr: mapping.start, len, mapping: Some(Arc::new(mapping)) };
        }
        let layout = Layout::from_size_align(len, SEGMENT_ALIGN).expect("allocation size overflows isize");
        // SAFETY: `layout` has non-zero size.
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(raw) else { alloc::handle_alloc_error(layout) };
        Self { ptr, len, mapping: None }
    }

    /// A handle that faults this buffer's pages in, front to back, from another thread.
    ///
    /// First touch of fresh memory (a page fault plus the kernel zeroing the page) costs about
    /// 0.9 CPU-s per GiB on this project's VMs. A receiver that copies into a fresh buffer runs
    /// [`Prefault::run`] on a blocking thread while it copies: the pages are backed ahead of the
    /// copy instead of inside it, and the copy starts at once instead of after a whole-buffer
    /// memset. `None` for buffers that are not a mapping of their own (small ones).
    pub fn prefault(&self) -> Option<Prefault> {
        self.mapping.as_ref().map(|m| Prefault { mapping: Arc::clone(m), len: self.len })
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
        // SAFETY: `ptr` is valid for `len` initialised bytes (zeroed at allocation or by the
        // kernel) or dangling with len 0.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    /// The bytes, mutably.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_slice`, and `&mut self` guarantees exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }

    /// Shortens the buffer to `len` bytes (no-op if it is not longer) and gives the memory past
    /// the new end back: a mapping's whole pages after it are released to the kernel (they read
    /// as zeros if touched again; a [`Prefault`] still running may do so), and a heap buffer is
    /// shrunk by the allocator. The bytes kept are not moved when mapped, so a finished iterate
    /// with halo rows after its owned ones becomes a result of the owned ones without a copy.
    pub fn truncate(&mut self, len: usize) {
        if len >= self.len {
            return;
        }
        if self.mapping.is_some() {
            #[cfg(target_os = "linux")]
            {
                let at = self.ptr.as_ptr() as usize;
                let (start, end) = ((at + len).next_multiple_of(PAGE), (at + self.len).next_multiple_of(PAGE));
                if end > start {
                    // SAFETY: `start..end` lies inside the mapping (its usable part is rounded up to
                    // whole huge pages); no byte in it is reachable once `len` is lowered, and
                    // MADV_DONTNEED on a private anonymous mapping only drops those pages.
                    unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_DONTNEED) };
                }
            }
            self.len = len;
            return;
        }
        if len == 0 {
            // The old buffer is freed as it is dropped.
            *self = Self::zeroed(0);
            return;
        }
        let layout = Layout::from_size_align(self.len, SEGMENT_ALIGN).expect("layout was valid at allocation");
        // SAFETY: allocated with `layout`; `len` is non-zero and below the old size. realloc keeps
        // the alignment and the first `len` bytes.
        let raw = unsafe { alloc::realloc(self.ptr.as_ptr(), layout, len) };
        let Some(ptr) = NonNull::new(raw) else {
            alloc::handle_alloc_error(Layout::from_size_align(len, SEGMENT_ALIGN).expect("smaller than a valid layout"))
        };
        (self.ptr, self.len) = (ptr, len);
    }

    /// Views the buffer as a slice of `T` (the length must be a multiple of `size_of::<T>()`).
    pub fn as_typed<T: Pod>(&self) -> &[T] {
        let size = std::mem::size_of::<T>();
        assert!(self.len.is_multiple_of(size), "buffer of {} bytes is not a whole number of {}", self.len, T::NAME);
        // SAFETY: the allocation is 64-byte aligned (≥ align_of::<T>()) and initialised, and
        // every bit pattern is a valid `T` (sealed `Pod`).
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr().cast::<T>(), self.len / size) }
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
        // A mapping is unmapped when its last holder (this buffer or a `Prefault`) lets go.
        if self.len != 0 && self.mapping.is_none() {
            let layout = Layout::from_size_align(self.len, SEGMENT_ALIGN).expect("layout was valid at allocation");
            // SAFETY: allocated in `zeroed` with this exact layout.
            unsafe { alloc::dealloc(self.ptr.as_ptr(), layout) };
        }
    }
}

impl fmt::Debug for AlignedBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AlignedBytes").field("len", &self.len).field("mapped", &self.mapping.is_some()).finish()
    }
}

/// A fixed-length, zeroed vector of `f32` for the kernels' iterates, in an [`AlignedBytes`]: on a
/// cache line, and from 2 MiB up on a 2 MiB page advised for huge pages.
///
/// A large `Vec<f32>` starts 16 bytes past a page boundary (glibc's header on its own mapping),
/// so each 256-byte APPNP feature row (d = 64) spans five cache lines instead of four and every
/// 64-byte vector load of it is split over two; on aligned rows the step measured about 13 %
/// faster (benches/RESULTS.md, 2026-12-06). A finished iterate becomes a result
/// ([`Self::into_segment`]) without a copy.
#[derive(Debug)]
pub struct AlignedFloats(AlignedBytes);

impl AlignedFloats {
    /// `len` zeros.
    pub fn zeroed(len: usize) -> Self {
        Self(AlignedBytes::zeroed(len.checked_mul(4).expect("allocation size overflows usize")))
    }

    /// Keeps the first `len` values and gives the memory after them back
    /// ([`AlignedBytes::truncate`]).
    pub fn truncate(&mut self, len: usize) {
        self.0.truncate(len.checked_mul(4).expect("length overflows usize"));
    }

    /// The values as a segment, without a copy.
    pub fn into_segment(self) -> Segment<f32> {
        Segment::from_aligned(self.0)
    }

    /// The buffer behind `segment`, back as an owned buffer without a copy, when the segment is
    /// all of a heap buffer and nothing else shares it any more; otherwise the segment unchanged.
    pub fn reclaim(segment: Segment<f32>) -> Result<Self, Segment<f32>> {
        let Segment { storage, offset, len, _t } = segment;
        let back = |storage| Segment { storage, offset, len, _t: PhantomData };
        if offset != 0 {
            return Err(back(storage));
        }
        match Arc::try_unwrap(storage) {
            Ok(Storage::Heap(buf)) if buf.len() == len * 4 => Ok(Self(buf)),
            Ok(other) => Err(back(Arc::new(other))),
            Err(shared) => Err(back(shared)),
        }
    }
}

impl Default for AlignedFloats {
    fn default() -> Self {
        Self::zeroed(0)
    }
}

impl Deref for AlignedFloats {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        self.0.as_typed()
    }
}

impl std::ops::DerefMut for AlignedFloats {
    fn deref_mut(&mut self) -> &mut [f32] {
        self.0.as_mut_typed()
    }
}

/// An anonymous private mapping whose usable part starts on a 2 MiB boundary.
struct Mapping {
    /// Start of the whole mapping (for `munmap`).
    base: *mut libc::c_void,
    size: usize,
    /// First 2 MiB boundary inside it: where the buffer's bytes start.
    start: NonNull<u8>,
}

// SAFETY: the mapping is plain memory; access to its bytes is governed by the `AlignedBytes`
// that owns it, and `Prefault` only passes its address range to the kernel.
unsafe impl Send for Mapping {}
// SAFETY: as above; `&Mapping` gives no access to the bytes.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Maps `len` bytes (plus slack to align the start), advised for huge pages; `None` if the
    /// kernel refuses (the caller then falls back to the allocator).
    #[cfg(target_os = "linux")]
    fn new(len: usize) -> Option<Self> {
        let size = len.checked_add(HUGE_PAGE)?;
        // SAFETY: a fresh anonymous private mapping; no existing memory is affected.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return None;
        }
        let start = (base as usize).next_multiple_of(HUGE_PAGE);
        let whole = len.next_multiple_of(HUGE_PAGE);
        // SAFETY: `start..start + whole` lies inside the mapping (`size` = len + 2 MiB covers the
        // alignment slack, and the tail round-up stays inside the last huge page of the slack);
        // madvise only changes paging hints.
        unsafe {
            libc::madvise(start as *mut libc::c_void, whole.min(base as usize + size - start), libc::MADV_HUGEPAGE)
        };
        Some(Self { base, size, start: NonNull::new(start as *mut u8)? })
    }

    #[cfg(not(target_os = "linux"))]
    fn new(_len: usize) -> Option<Self> {
        None
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: `base..base + size` is exactly the mapping created in `new`, unmapped once.
        #[cfg(target_os = "linux")]
        unsafe {
            libc::munmap(self.base, self.size)
        };
    }
}

/// Faults a mapped [`AlignedBytes`] in from another thread (see [`AlignedBytes::prefault`]).
///
/// It never reads or writes the buffer: it asks the kernel (`MADV_POPULATE_WRITE`) to back the
/// pages, which leaves any page that is already backed — one the writer got to first — exactly
/// as it is. Holding it keeps the mapping alive, so it may outlive the buffer safely.
pub struct Prefault {
    mapping: Arc<Mapping>,
    len: usize,
}

impl Prefault {
    /// Bytes backed per call.
    const STEP: usize = 8 << 20;

    /// Backs the buffer's pages front to back, calling `progress` with the number of leading
    /// bytes backed so far after each step; it returns false to stop early. Ends when done, when
    /// stopped, or when the kernel refuses (pre-5.14 kernels lack the call; the writer then faults
    /// pages itself). Returns whether the whole buffer was backed.
    #[cfg(target_os = "linux")]
    pub fn run(&self, mut progress: impl FnMut(usize) -> bool) -> bool {
        let start = self.mapping.start.as_ptr() as usize;
        let mut at = 0;
        while at < self.len {
            let n = Self::STEP.min(self.len - at).next_multiple_of(PAGE);
            // SAFETY: the range lies inside the mapping, which `self` keeps alive; populating
            // does not change the contents of any page, backed or not.
            let r = unsafe { libc::madvise((start + at) as *mut libc::c_void, n, libc::MADV_POPULATE_WRITE) };
            if r != 0 {
                return false;
            }
            at = (at + n).min(self.len);
            if !progress(at) {
                return at == self.len;
            }
        }
        true
    }

    #[cfg(not(target_os = "linux"))]
    pub fn run(&self, _progress: impl FnMut(usize) -> bool) -> bool {
        false
    }
}

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
            Storage::Floats(v) => pod_bytes(v),
        }
    }
}

impl Storage {
    /// Drops this process's resident pages of a file mapping; the kernel reads them back from the
    /// file (usually still in the page cache) when they are next touched. Other storage keeps its
    /// memory. For a holder that has read a whole graph once and needs it again only to recover.
    pub fn release_resident(&self) {
        if let Storage::Mapped(m) = self {
            // SAFETY: the mapping is read-only and file-backed, so dropping its pages discards
            // nothing: they refault with the file's contents, which must not change while mapped
            // anyway (the kernel may evict clean file pages at any time and refault them the same
            // way). Best effort: a refusal leaves the pages resident.
            let _ = unsafe { m.unchecked_advise(memmap2::UncheckedAdvice::DontNeed) };
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

/// A `/proc/meminfo` field (`"MemTotal"`, `"MemAvailable"`, …) in bytes; `None` where the file
/// or the field does not exist (not Linux) or does not parse.
pub fn meminfo(field: &str) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    meminfo_field(&text, field)
}

fn meminfo_field(text: &str, field: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.split(':').next() == Some(field))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

/// Bytes this process could still allocate without the kernel reclaiming or killing: the host's
/// `MemAvailable`, lowered to the headroom of each memory cgroup it runs under (a container's
/// limit, v2 or v1) when there is one. `None` when the host's figure is unknown.
pub fn available_memory() -> Option<u64> {
    let host = meminfo("MemAvailable")?;
    let own = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    Some(own.lines().filter_map(cgroup_headroom).fold(host, u64::min))
}

/// The headroom of the memory cgroup named by one line of `/proc/self/cgroup`
/// (`id:controllers:path`; v2's line has no controllers), if it has a limit.
///
/// The cgroup's directory is looked up under the controller's mount, then at the mount itself
/// (inside a container's cgroup namespace, or where the host's path is not visible).
fn cgroup_headroom(line: &str) -> Option<u64> {
    let mut fields = line.splitn(3, ':');
    let (_, controllers, path) = (fields.next()?, fields.next()?, fields.next()?);
    let (mount, files) = match controllers {
        "" => ("/sys/fs/cgroup", ["memory.max", "memory.current", "inactive_file"]),
        c if c.split(',').any(|c| c == "memory") => {
            ("/sys/fs/cgroup/memory", ["memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file"])
        }
        _ => return None,
    };
    let mount = std::path::Path::new(mount);
    [mount.join(path.trim().trim_start_matches('/')), mount.to_path_buf()].into_iter().find_map(|dir| {
        let read = |name: &str| std::fs::read_to_string(dir.join(name)).ok();
        let stat = read("memory.stat").unwrap_or_default();
        headroom(&read(files[0])?, &read(files[1])?, &stat, files[2])
    })
}

/// `limit − (usage − inactive file pages)`: a cgroup's usage counts the page cache, of which the
/// inactive part is reclaimed before the limit bites (the working set, as container runtimes
/// count it). `None` for no limit (`max`) or text that does not parse.
fn headroom(limit: &str, usage: &str, stat: &str, inactive_key: &str) -> Option<u64> {
    let limit: u64 = limit.trim().parse().ok()?;
    let usage: u64 = usage.trim().parse().ok()?;
    let inactive = stat
        .lines()
        .find_map(|l| l.strip_prefix(inactive_key)?.strip_prefix(' ')?.trim().parse::<u64>().ok())
        .unwrap_or(0);
    Some(limit.saturating_sub(usage.saturating_sub(inactive)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A segment gives its buffer back only when it is all of it and nothing shares it.
    #[test]
    fn reclaim_takes_back_a_whole_unshared_buffer() {
        let mut f = AlignedFloats::zeroed(1000);
        f[7] = 3.5;
        let seg = f.into_segment();
        let part = seg.slice(1..1000);
        let seg = AlignedFloats::reclaim(seg).unwrap_err();
        assert!(AlignedFloats::reclaim(part).is_err(), "a slice is not the whole buffer");
        let back = AlignedFloats::reclaim(seg).expect("whole and unshared");
        assert_eq!((back.len(), back[7]), (1000, 3.5));
        let copied = Segment::from_slice(&[1.0f32; 10]);
        assert!(AlignedFloats::reclaim(copied).is_ok());
    }

    #[test]
    fn memory_figures_parse() {
        let text = "MemTotal:       24731436 kB\nMemFree:        14496668 kB\nMemAvailable:   24157164 kB\n";
        assert_eq!(meminfo_field(text, "MemAvailable"), Some(24157164 * 1024));
        assert_eq!(meminfo_field(text, "MemTotal"), Some(24731436 * 1024));
        // A field is matched whole, not by prefix.
        assert_eq!(meminfo_field(text, "Mem"), None);
        assert_eq!(meminfo_field("MemAvailable: lots kB\n", "MemAvailable"), None);
        let stat = "active_file 1000\ninactive_file 268435456\n";
        assert_eq!(headroom("1073741824\n", "536870912\n", stat, "inactive_file"), Some(805306368));
        assert_eq!(headroom("1073741824\n", "536870912\n", "", "inactive_file"), Some(536870912));
        assert_eq!(headroom("max\n", "268435456\n", stat, "inactive_file"), None);
        assert_eq!(headroom("100\n", "200\n", "", "inactive_file"), Some(0));
        assert_eq!(cgroup_headroom("3:cpu,cpuacct:/"), None, "not a memory cgroup");
        // On this Linux host both figures exist and the available one fits in the total.
        if let (Some(total), Some(available)) = (meminfo("MemTotal"), available_memory()) {
            assert!(0 < available && available <= total);
        }
    }

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
    fn large_buffers_are_zeroed_mappings_aligned_to_huge_pages() {
        let len = 5 * HUGE_PAGE + 12_345;
        let buf = AlignedBytes::zeroed(len);
        assert_eq!(buf.len(), len);
        assert!(buf.as_slice().iter().all(|&b| b == 0));
        if cfg!(target_os = "linux") {
            assert_eq!(buf.as_slice().as_ptr() as usize % HUGE_PAGE, 0);
            assert!(buf.prefault().is_some());
        }
        assert!(AlignedBytes::zeroed(4096).prefault().is_none(), "small buffers come from the allocator");
    }

    #[test]
    fn truncate_keeps_the_prefix_and_gives_the_rest_back() {
        // A mapping: the kept bytes stay where they are, the whole pages after them leave memory.
        let mut buf = AlignedBytes::zeroed(4 * HUGE_PAGE);
        buf.as_mut_slice().iter_mut().enumerate().for_each(|(i, b)| *b = i as u8);
        let at = buf.as_slice().as_ptr();
        let keep = HUGE_PAGE + 100;
        buf.truncate(keep);
        assert_eq!((buf.len(), buf.as_slice().as_ptr()), (keep, at));
        assert!(buf.as_slice().iter().enumerate().all(|(i, &b)| b == i as u8));
        #[cfg(target_os = "linux")]
        {
            // mincore: one byte per 4 KiB page, low bit set when resident.
            let first = (at as usize + keep).next_multiple_of(PAGE);
            let end = at as usize + 4 * HUGE_PAGE;
            let mut resident = vec![0u8; (end - first) / PAGE];
            // SAFETY: `first..end` lies inside the buffer's mapping (still mapped: `buf` lives),
            // page aligned; `resident` has one byte per page.
            let rc = unsafe { libc::mincore(first as *mut libc::c_void, end - first, resident.as_mut_ptr()) };
            assert_eq!(rc, 0);
            assert!(resident.iter().all(|&r| r & 1 == 0), "pages past the new end are released");
        }
        buf.truncate(keep + 1);
        assert_eq!(buf.len(), keep, "truncate never grows");

        // A heap buffer: shrunk by the allocator, contents kept, still aligned.
        let mut small = AlignedFloats::zeroed(1000);
        small.iter_mut().enumerate().for_each(|(i, v)| *v = i as f32);
        small.truncate(10);
        assert_eq!(&small[..], &(0..10).map(|i| i as f32).collect::<Vec<_>>()[..]);
        assert_eq!(small.as_ptr() as usize % SEGMENT_ALIGN, 0);
        small.truncate(0);
        assert!(small.is_empty());
    }

    #[test]
    fn prefault_backs_pages_without_touching_written_bytes() {
        let len = 3 * Prefault::STEP + 100;
        let mut buf = AlignedBytes::zeroed(len);
        let Some(prefault) = buf.prefault() else { return };
        // The writer gets there first for some pages; the prefault must leave them alone.
        buf.as_mut_slice()[..Prefault::STEP + 7].fill(0xab);
        buf.as_mut_slice()[len - 1] = 0xcd;
        let mut steps = Vec::new();
        let whole = prefault.run(|backed| {
            steps.push(backed);
            true
        });
        if whole {
            assert_eq!(steps.last(), Some(&len), "progress ends at the buffer's length");
            assert!(steps.windows(2).all(|w| w[0] < w[1]));
        }
        assert!(buf.as_slice()[..Prefault::STEP + 7].iter().all(|&b| b == 0xab));
        assert!(buf.as_slice()[Prefault::STEP + 7..len - 1].iter().all(|&b| b == 0));
        assert_eq!(buf.as_slice()[len - 1], 0xcd);
    }

    #[test]
    fn prefault_stops_when_asked_and_may_outlive_its_buffer() {
        let buf = AlignedBytes::zeroed(4 * Prefault::STEP);
        let Some(prefault) = buf.prefault() else { return };
        drop(buf);
        let mut calls = 0;
        assert!(!prefault.run(|_| {
            calls += 1;
            false
        }));
        assert!(calls <= 1);
    }

    #[test]
    fn empty_segments_are_fine() {
        let s = Segment::<f32>::from_slice(&[]);
        assert!(s.is_empty());
    }
}
