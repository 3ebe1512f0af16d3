//! The peer wire codec, sans-IO: pure functions from bytes to validated headers and payload
//! layouts, and from headers to bytes. No sockets, no async, no allocation sized by a peer
//! before the size is checked against [`Limits`].
//!
//! Layout on a stream (see `proto/proto/peer.proto`):
//!
//! ```text
//! stream  := "QVS1" u32le(len) StreamHeader[len]  body
//! body    := message*                      (control, raft, heartbeat, serving)
//!          | frame*                        (partition push, halo exchange)
//! message := u32le(len) bytes[len]
//! frame   := "QVF1" u32le(len) FrameHeader[len] payload
//! payload := seg0 pad seg1 pad … segN      (segment i starts at a multiple of 64 from the payload start)
//! ```
//!
//! The payload length is not on the wire: it follows from the segment list, which is checked
//! (count, element type, checked arithmetic, total against `max_frame_bytes`) before the receiver
//! allocates the one aligned buffer it copies the payload into.

use bytes::{BufMut, Bytes, BytesMut};
use prost::Message;
use quiver_compute::SEGMENT_ALIGN;
use quiver_proto::peer::{ElemType, FrameHeader, SegmentDesc, StreamHeader, StreamKind};

/// Magic that opens every stream.
pub const STREAM_MAGIC: [u8; 4] = *b"QVS1";
/// Magic that opens every frame.
pub const FRAME_MAGIC: [u8; 4] = *b"QVF1";
/// Bytes of a stream or frame prefix (magic + u32 length).
pub const PREFIX_LEN: usize = 8;
/// Bytes of a message length prefix.
pub const MESSAGE_PREFIX_LEN: usize = 4;

/// Bounds on everything a peer can ask us to allocate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest encoded `StreamHeader` or `FrameHeader` (default 64 KiB).
    pub max_header_bytes: u32,
    /// Most array segments in one frame (default 64).
    pub max_segments: u32,
    /// Largest frame payload (default 2 GiB).
    pub max_frame_bytes: u64,
    /// Largest length-delimited message on a control/raft/heartbeat/serving stream (default 16 MiB).
    pub max_message_bytes: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self { max_header_bytes: 64 << 10, max_segments: 64, max_frame_bytes: 2 << 30, max_message_bytes: 16 << 20 }
    }
}

/// Why bytes from a peer were refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    #[error("bad magic {found:02x?}, expected {expected:02x?}")]
    BadMagic { found: [u8; 4], expected: [u8; 4] },
    #[error("header of {len} bytes exceeds the limit of {max}")]
    HeaderTooLarge { len: u64, max: u32 },
    #[error("message of {len} bytes exceeds the limit of {max}")]
    MessageTooLarge { len: u64, max: u32 },
    #[error("{count} segments exceed the limit of {max}")]
    TooManySegments { count: usize, max: u32 },
    #[error("frame payload of {len} bytes exceeds the limit of {max}")]
    FrameTooLarge { len: u128, max: u64 },
    #[error("segment {index}: {reason}")]
    BadSegment { index: usize, reason: String },
    #[error("undecodable {what}: {reason}")]
    Decode { what: &'static str, reason: String },
    #[error("{0}")]
    Convert(#[from] quiver_proto::ConvertError),
}

/// Where one segment lies in a frame payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentSlot {
    pub elem: ElemType,
    /// Elements.
    pub count: u64,
    /// Byte offset from the payload start (a multiple of 64).
    pub offset: u64,
    /// Bytes.
    pub len: u64,
}

/// The validated shape of a frame payload.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PayloadLayout {
    pub slots: Vec<SegmentSlot>,
    /// Total payload bytes, padding included (no trailing padding after the last segment).
    pub total: u64,
}

fn align_up(x: u128) -> u128 {
    x.next_multiple_of(SEGMENT_ALIGN as u128)
}

/// Computes and checks the payload layout of a segment list.
pub fn layout(segments: &[SegmentDesc], limits: &Limits) -> Result<PayloadLayout, CodecError> {
    if segments.len() > limits.max_segments as usize {
        return Err(CodecError::TooManySegments { count: segments.len(), max: limits.max_segments });
    }
    let mut slots = Vec::with_capacity(segments.len());
    // u128 arithmetic: a u64 count times a width of up to 8 plus offsets cannot overflow it.
    let mut end: u128 = 0;
    for (index, s) in segments.iter().enumerate() {
        let elem = ElemType::from_wire(s.elem).map_err(|e| CodecError::BadSegment { index, reason: e.to_string() })?;
        let width = elem.width().expect("from_wire refuses unspecified") as u128;
        let offset = align_up(end);
        let len = u128::from(s.count) * width;
        end = offset + len;
        if end > u128::from(limits.max_frame_bytes) {
            return Err(CodecError::FrameTooLarge { len: end, max: limits.max_frame_bytes });
        }
        slots.push(SegmentSlot { elem, count: s.count, offset: offset as u64, len: len as u64 });
    }
    Ok(PayloadLayout { slots, total: end as u64 })
}

fn prefixed(magic: [u8; 4], body: &impl Message) -> Bytes {
    let len = body.encoded_len();
    let mut b = BytesMut::with_capacity(PREFIX_LEN + len);
    b.put_slice(&magic);
    b.put_u32_le(len as u32);
    body.encode(&mut b).expect("capacity reserved");
    b.freeze()
}

/// Encodes the preamble that opens a stream.
pub fn encode_stream_header(header: &StreamHeader) -> Bytes {
    prefixed(STREAM_MAGIC, header)
}

/// Encodes a frame's prefix and header (the payload follows as separate chunks).
pub fn encode_frame_head(header: &FrameHeader) -> Bytes {
    prefixed(FRAME_MAGIC, header)
}

/// Encodes a length-delimited message.
pub fn encode_message(msg: &impl Message) -> Bytes {
    let len = msg.encoded_len();
    let mut b = BytesMut::with_capacity(MESSAGE_PREFIX_LEN + len);
    b.put_u32_le(len as u32);
    msg.encode(&mut b).expect("capacity reserved");
    b.freeze()
}

fn decode_prefix(prefix: &[u8; PREFIX_LEN], magic: [u8; 4], limits: &Limits) -> Result<usize, CodecError> {
    let found: [u8; 4] = prefix[..4].try_into().expect("4 bytes");
    if found != magic {
        return Err(CodecError::BadMagic { found, expected: magic });
    }
    let len = u32::from_le_bytes(prefix[4..].try_into().expect("4 bytes"));
    if len > limits.max_header_bytes {
        return Err(CodecError::HeaderTooLarge { len: len.into(), max: limits.max_header_bytes });
    }
    Ok(len as usize)
}

/// Checks a stream prefix; returns the header length to read next.
pub fn decode_stream_prefix(prefix: &[u8; PREFIX_LEN], limits: &Limits) -> Result<usize, CodecError> {
    decode_prefix(prefix, STREAM_MAGIC, limits)
}

/// Decodes and validates a stream header.
pub fn decode_stream_header(bytes: &[u8]) -> Result<(StreamHeader, StreamKind), CodecError> {
    let h =
        StreamHeader::decode(bytes).map_err(|e| CodecError::Decode { what: "stream header", reason: e.to_string() })?;
    let kind = StreamKind::from_wire(h.kind)?;
    Ok((h, kind))
}

/// Checks a frame prefix; returns the header length to read next.
pub fn decode_frame_prefix(prefix: &[u8; PREFIX_LEN], limits: &Limits) -> Result<usize, CodecError> {
    decode_prefix(prefix, FRAME_MAGIC, limits)
}

/// Decodes a frame header and checks its payload layout against `limits`.
pub fn decode_frame_header(bytes: &[u8], limits: &Limits) -> Result<(FrameHeader, PayloadLayout), CodecError> {
    let h =
        FrameHeader::decode(bytes).map_err(|e| CodecError::Decode { what: "frame header", reason: e.to_string() })?;
    let layout = layout(&h.segments, limits)?;
    Ok((h, layout))
}

/// Checks a message length prefix; returns the body length to read next.
pub fn decode_message_prefix(prefix: &[u8; MESSAGE_PREFIX_LEN], limits: &Limits) -> Result<usize, CodecError> {
    let len = u32::from_le_bytes(*prefix);
    if len > limits.max_message_bytes {
        return Err(CodecError::MessageTooLarge { len: len.into(), max: limits.max_message_bytes });
    }
    Ok(len as usize)
}

/// Padding bytes (zeros) to insert before a segment at `offset`, shared, never allocated.
pub fn padding(len: usize) -> Bytes {
    static ZEROS: [u8; SEGMENT_ALIGN] = [0; SEGMENT_ALIGN];
    debug_assert!(len < SEGMENT_ALIGN);
    Bytes::from_static(&ZEROS[..len])
}

/// Outcome of parsing a frame out of a contiguous buffer.
#[derive(Debug, Clone, PartialEq)]
pub enum Parsed {
    /// At least this many bytes in total are needed before more can be said.
    Incomplete { need: u64 },
    /// A whole frame: its header, layout, and where the payload lies in the buffer.
    Frame { header: FrameHeader, layout: PayloadLayout, payload_start: usize },
}

/// Parses one frame from the start of `buf`, validating as the stream driver does.
///
/// The driver reads from QUIC in exactly these steps; this whole-buffer form exists for property
/// tests and the fuzz target, and for callers that hold a frame in memory.
pub fn parse_frame(buf: &[u8], limits: &Limits) -> Result<Parsed, CodecError> {
    let Some(prefix) = buf.get(..PREFIX_LEN) else {
        return Ok(Parsed::Incomplete { need: PREFIX_LEN as u64 });
    };
    let hlen = decode_frame_prefix(prefix.try_into().expect("prefix length"), limits)?;
    let Some(hbytes) = buf.get(PREFIX_LEN..PREFIX_LEN + hlen) else {
        return Ok(Parsed::Incomplete { need: (PREFIX_LEN + hlen) as u64 });
    };
    let (header, layout) = decode_frame_header(hbytes, limits)?;
    let payload_start = PREFIX_LEN + hlen;
    let need = payload_start as u64 + layout.total;
    if (buf.len() as u64) < need {
        return Ok(Parsed::Incomplete { need });
    }
    Ok(Parsed::Frame { header, layout, payload_start })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn desc(elem: ElemType, count: u64) -> SegmentDesc {
        SegmentDesc { elem: elem as i32, count, name: String::new() }
    }

    #[test]
    fn segments_start_on_64_byte_boundaries() {
        let l = layout(
            &[desc(ElemType::U8, 3), desc(ElemType::F64, 2), desc(ElemType::U32, 0), desc(ElemType::U32, 1)],
            &Limits::default(),
        )
        .unwrap();
        let offsets: Vec<u64> = l.slots.iter().map(|s| s.offset).collect();
        assert_eq!(offsets, vec![0, 64, 128, 128]);
        assert_eq!(l.total, 132);
    }

    #[test]
    fn limits_are_checked_before_allocation() {
        let limits = Limits { max_frame_bytes: 1 << 20, max_segments: 2, ..Limits::default() };
        assert!(matches!(layout(&[desc(ElemType::U64, u64::MAX)], &limits), Err(CodecError::FrameTooLarge { .. })));
        assert!(matches!(
            layout(&[desc(ElemType::U8, 1), desc(ElemType::U8, 1), desc(ElemType::U8, 1)], &limits),
            Err(CodecError::TooManySegments { count: 3, max: 2 })
        ));
        assert!(matches!(
            layout(&[desc(ElemType::Unspecified, 1)], &limits),
            Err(CodecError::BadSegment { index: 0, .. })
        ));
        let mut p = [0u8; 8];
        p[..4].copy_from_slice(&FRAME_MAGIC);
        p[4..].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(decode_frame_prefix(&p, &limits), Err(CodecError::HeaderTooLarge { .. })));
        assert!(matches!(decode_stream_prefix(&p, &limits), Err(CodecError::BadMagic { .. })));
        assert!(decode_message_prefix(&u32::MAX.to_le_bytes(), &limits).is_err());
    }

    fn arb_header() -> impl Strategy<Value = FrameHeader> {
        let seg =
            (1i32..=5, 0u64..5000, "[a-z]{0,8}").prop_map(|(elem, count, name)| SegmentDesc { elem, count, name });
        (proptest::collection::vec(seg, 0..8), any::<bool>(), any::<u32>(), any::<u64>()).prop_map(
            |(segments, last, p, sv)| FrameHeader {
                segments,
                last,
                meta: Some(quiver_proto::peer::frame_header::Meta::Partition(quiver_proto::peer::PartitionMeta {
                    partition: p,
                    first_vertex: sv,
                    ..Default::default()
                })),
            },
        )
    }

    proptest! {
        #[test]
        fn encode_then_parse_is_identity(header in arb_header(), fill in any::<u8>()) {
            let limits = Limits::default();
            let head = encode_frame_head(&header);
            let lay = layout(&header.segments, &limits).unwrap();
            let mut buf = head.to_vec();
            buf.resize(head.len() + lay.total as usize, fill);
            match parse_frame(&buf, &limits).unwrap() {
                Parsed::Frame { header: h, layout: l, payload_start } => {
                    prop_assert_eq!(h, header);
                    prop_assert_eq!(l, lay);
                    prop_assert_eq!(payload_start, head.len());
                }
                other => prop_assert!(false, "expected a frame, got {:?}", other),
            }
            // Every strict prefix is incomplete, never an error.
            let cut = buf.len().saturating_sub(1);
            if !buf.is_empty() {
                let parsed = parse_frame(&buf[..cut], &limits);
                prop_assert!(matches!(parsed, Ok(Parsed::Incomplete { .. })), "prefix gave {:?}", parsed);
            }
        }

        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let limits = Limits::default();
            let _ = parse_frame(&bytes, &limits);
            let mut framed = FRAME_MAGIC.to_vec();
            framed.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
            framed.extend_from_slice(&bytes);
            let _ = parse_frame(&framed, &limits);
            let _ = decode_stream_header(&bytes);
        }
    }
}
