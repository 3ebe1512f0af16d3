//! Stream preamble decoding must never panic and refuse unknown kinds.
#![no_main]

use libfuzzer_sys::fuzz_target;
use quiver_node_agent::transport::codec::{self, Limits, PREFIX_LEN};

fuzz_target!(|data: &[u8]| {
    let limits = Limits::default();
    if data.len() >= PREFIX_LEN {
        let prefix: [u8; PREFIX_LEN] = data[..PREFIX_LEN].try_into().unwrap();
        if let Ok(len) = codec::decode_stream_prefix(&prefix, &limits) {
            assert!(len <= limits.max_header_bytes as usize);
            let body = &data[PREFIX_LEN..];
            let _ = codec::decode_stream_header(&body[..len.min(body.len())]);
        }
    }
    let _ = codec::decode_stream_header(data);
});
