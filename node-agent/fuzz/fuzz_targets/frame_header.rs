//! Frame prefix, header and payload layout decoding must never panic, never allocate beyond the
//! limits, and accept only layouts whose segments lie inside the payload on 64-byte boundaries.
#![no_main]

use libfuzzer_sys::fuzz_target;
use quiver_node_agent::transport::codec::{self, Limits, Parsed};

fuzz_target!(|data: &[u8]| {
    let limits = Limits { max_frame_bytes: 1 << 20, ..Limits::default() };
    if let Ok(Parsed::Frame { layout, payload_start, .. }) = codec::parse_frame(data, &limits) {
        assert!(layout.total <= limits.max_frame_bytes);
        assert!(payload_start as u64 + layout.total <= data.len() as u64);
        for s in &layout.slots {
            assert_eq!(s.offset % 64, 0);
            assert!(s.offset + s.len <= layout.total);
        }
    }
    // The same bytes behind a valid magic, so the header decoder sees them too.
    let mut framed = codec::FRAME_MAGIC.to_vec();
    framed.extend_from_slice(&(data.len() as u32).to_le_bytes());
    framed.extend_from_slice(data);
    let _ = codec::parse_frame(&framed, &limits);
    if data.len() >= 4 {
        let _ = codec::decode_message_prefix(&data[..4].try_into().unwrap(), &limits);
    }
});
