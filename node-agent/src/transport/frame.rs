//! Zero-copy frames: what a sender hands to quinn and what a receiver hands to compute.
//!
//! Send: an [`OutFrame`] is the encoded header plus one `Bytes` per array segment that points
//! straight into the segment's storage (kept alive by an owner holding its `Arc`), with shared
//! static zero padding between segments. Nothing is serialised and no array byte is copied in user space.
//!
//! Receive: an [`InFrame`] owns the one 64-byte-aligned buffer the stream driver copied the QUIC
//! chunks into; its segments are views into that buffer, read in place by compute. There is no
//! decode step for arrays.

use std::sync::Arc;

use bytes::Bytes;
use quiver_compute::buf::Storage;
use quiver_compute::{AlignedBytes, Pod, Segment};
use quiver_proto::peer::{ElemType, FrameHeader, SegmentDesc, frame_header};

use super::codec::{self, CodecError, Limits, PayloadLayout};

/// Keeps a segment's storage alive for as long as quinn holds the `Bytes` that point into it.
struct SegmentOwner<T: Pod>(Segment<T>);

impl<T: Pod> AsRef<[u8]> for SegmentOwner<T> {
    fn as_ref(&self) -> &[u8] {
        self.0.as_bytes()
    }
}

/// A frame ready to send: header plus borrowed-by-refcount array segments.
#[derive(Debug, Clone, Default)]
pub struct OutFrame {
    header: FrameHeader,
    segments: Vec<Bytes>,
}

impl OutFrame {
    /// A frame with the given metadata and no segments yet.
    pub fn new(meta: Option<frame_header::Meta>) -> Self {
        Self { header: FrameHeader { meta, ..Default::default() }, segments: Vec::new() }
    }

    /// Appends an array segment (no copy: the frame holds a reference to the segment's storage).
    pub fn push<T: Pod>(&mut self, name: &str, segment: &Segment<T>) -> &mut Self {
        self.header.segments.push(SegmentDesc {
            elem: ElemType::of::<T>() as i32,
            count: segment.len() as u64,
            name: name.to_owned(),
        });
        self.segments.push(Bytes::from_owner(SegmentOwner(segment.clone())));
        self
    }

    /// Marks the frame as the last of its transfer.
    pub fn set_last(&mut self, last: bool) -> &mut Self {
        self.header.last = last;
        self
    }

    /// The frame header.
    pub fn header(&self) -> &FrameHeader {
        &self.header
    }

    /// Payload bytes (segments and padding).
    pub fn payload_len(&self, limits: &Limits) -> Result<u64, CodecError> {
        Ok(codec::layout(&self.header.segments, limits)?.total)
    }

    /// The chunks handed to quinn's `write_all_chunks`, in wire order: head, then each segment
    /// preceded by its padding. Segment chunks point into the segments' own memory.
    pub fn wire_chunks(&self, limits: &Limits) -> Result<Vec<Bytes>, CodecError> {
        let layout = codec::layout(&self.header.segments, limits)?;
        let mut chunks = Vec::with_capacity(1 + 2 * self.segments.len());
        chunks.push(codec::encode_frame_head(&self.header));
        let mut at = 0u64;
        for (slot, bytes) in layout.slots.iter().zip(&self.segments) {
            let pad = (slot.offset - at) as usize;
            if pad > 0 {
                chunks.push(codec::padding(pad));
            }
            if !bytes.is_empty() {
                chunks.push(bytes.clone());
            }
            at = slot.offset + slot.len;
        }
        Ok(chunks)
    }
}

/// How the receive path moved a frame's payload (evidence for the exactly-one-copy rule).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CopyStats {
    /// QUIC chunks read.
    pub chunks: u64,
    /// Bytes copied from chunks into the payload buffer (equals the payload length: one copy each).
    pub bytes_copied: u64,
    /// Payload buffers allocated: one per frame, none when a caller's buffer was reused.
    pub buffers: u32,
    /// Whether the payload went into a buffer the caller handed back.
    pub reused: bool,
}

/// Why a segment of a received frame could not be viewed as asked.
#[derive(Debug, thiserror::Error)]
pub enum SegmentAccessError {
    #[error("frame has {count} segments, no segment {index}")]
    NoSuchSegment { index: usize, count: usize },
    #[error("segment {index} holds {actual:?}, not {wanted}")]
    WrongType { index: usize, actual: ElemType, wanted: &'static str },
    #[error("segment {index}: {source}")]
    View { index: usize, source: quiver_compute::buf::SegmentError },
}

/// A received frame: its header and the aligned payload buffer its segments live in.
#[derive(Debug)]
pub struct InFrame {
    pub header: FrameHeader,
    layout: PayloadLayout,
    storage: Arc<Storage>,
    pub stats: CopyStats,
}

impl InFrame {
    pub(crate) fn new(header: FrameHeader, layout: PayloadLayout, storage: Arc<Storage>, stats: CopyStats) -> Self {
        Self { header, layout, storage, stats }
    }

    /// Number of segments.
    pub fn segment_count(&self) -> usize {
        self.layout.slots.len()
    }

    /// Payload bytes (segments and padding).
    pub fn payload_len(&self) -> u64 {
        self.layout.total
    }

    /// The storage all segments of this frame view into.
    pub fn storage(&self) -> &Arc<Storage> {
        &self.storage
    }

    /// Segment `index` viewed as `T`, in place (no copy, no decode).
    pub fn segment<T: Pod>(&self, index: usize) -> Result<Segment<T>, SegmentAccessError> {
        let slot = self
            .layout
            .slots
            .get(index)
            .ok_or(SegmentAccessError::NoSuchSegment { index, count: self.layout.slots.len() })?;
        if !slot.elem.matches::<T>() {
            return Err(SegmentAccessError::WrongType { index, actual: slot.elem, wanted: T::NAME });
        }
        Segment::view(Arc::clone(&self.storage), slot.offset as usize, slot.count as usize)
            .map_err(|source| SegmentAccessError::View { index, source })
    }

    /// Gives up the frame, returning its payload buffer for the next
    /// [`recv_frame_into`](super::PeerRecvStream::recv_frame_into) once no segment of it is
    /// alive any more (`None` while some still are).
    pub fn reclaim(self) -> Option<AlignedBytes> {
        match Arc::try_unwrap(self.storage) {
            Ok(Storage::Heap(buf)) => Some(buf),
            _ => None,
        }
    }

    /// The name the sender gave segment `index`.
    pub fn segment_name(&self, index: usize) -> Option<&str> {
        self.header.segments.get(index).map(|s| s.name.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn send_chunks_point_into_segment_memory() {
        let a = Segment::from_slice(&[1u32, 2, 3]);
        let b = Segment::from_slice(&[0.5f64; 9]);
        let mut f = OutFrame::new(None);
        f.push("a", &a).push("b", &b);
        let chunks = f.wire_chunks(&Limits::default()).unwrap();
        // head, a, pad, b
        assert_eq!(chunks.len(), 4);
        assert_eq!(chunks[1].as_ptr(), a.as_bytes().as_ptr(), "segment a was copied");
        assert_eq!(chunks[3].as_ptr(), b.as_bytes().as_ptr(), "segment b was copied");
        assert_eq!(chunks[2].len(), 64 - 12);
        // The frame keeps the storage alive after the caller drops its handles.
        let ptr = b.as_bytes().as_ptr();
        drop((a, b));
        assert_eq!(chunks[3].as_ptr(), ptr);
        assert_eq!(chunks[3].len(), 72);
    }
}
