//! The gRPC codec of every generated service: prost's encoding, decoding from one slice.
//!
//! tonic hands a decoder each message as a [`DecodeBuf`], a window on its receive buffer.
//! prost's generic decoder then reads every varint through that window's `Buf` calls — a bounds
//! check and an out-of-line `advance` per value. Decoding a serving request's two packed arrays
//! of 8,000 `uint32`s showed up in perf as about as much CPU as computing its 20 PageRank
//! iterations (`quiver bench serve --graph-size medium`, benches/RESULTS.md 2026-12-05 evening).
//! The window is contiguous (tonic buffers a whole message before decoding it), so
//! [`SliceCodec`] decodes from the `&[u8]` it covers, where prost's reads are plain slice
//! indexing (such a request decodes in 0.65–0.79 of the time), and copies only in the fallback
//! a non-contiguous buffer would need. Encoding is `tonic_prost`'s; the bytes on the wire are
//! the same either way.

use std::marker::PhantomData;

use prost::Message;
use prost::bytes::Buf;
use tonic::Status;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder};
use tonic_prost::ProstEncoder;

/// `application/grpc+proto` with prost, decoding each message from one slice (module docs).
#[derive(Debug, Clone)]
pub struct SliceCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for SliceCodec<T, U> {
    fn default() -> Self {
        SliceCodec(PhantomData)
    }
}

impl<T, U> Codec for SliceCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = SliceDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::default()
    }

    fn decoder(&mut self) -> Self::Decoder {
        SliceDecoder(PhantomData)
    }
}

/// Decodes `U` from the contiguous bytes of one message.
#[derive(Debug, Clone)]
pub struct SliceDecoder<U>(PhantomData<U>);

impl<U: Message + Default> Decoder for SliceDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        decode_whole(buf).map(Some)
    }

    fn buffer_settings(&self) -> BufferSettings {
        BufferSettings::default()
    }
}

/// Decodes one message from all of `buf`: in place when its bytes are contiguous, from a copy
/// otherwise. A message that does not parse is INTERNAL, as with `tonic_prost` (gRPC's status
/// code guide).
fn decode_whole<U: Message + Default>(buf: &mut impl Buf) -> Result<U, Status> {
    let len = buf.remaining();
    let item = if buf.chunk().len() == len {
        let item = U::decode(buf.chunk());
        buf.advance(len);
        item
    } else {
        let bytes = buf.copy_to_bytes(len);
        U::decode(&bytes[..])
    };
    item.map_err(|e| Status::internal(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::{DiffuseRequest, KernelParams};

    fn request() -> DiffuseRequest {
        DiffuseRequest {
            vertices: 300,
            sources: (0..1000).map(|i| i * 7 % 300).collect(),
            targets: (0..1000).map(|i| (i * 13 + 200) % 300).collect(),
            params: Some(KernelParams { max_iterations: 9, seeds: vec![3, 299], ..Default::default() }),
            features: vec![0.5, -1.0, f32::MAX],
            ..Default::default()
        }
    }

    #[test]
    fn decodes_contiguous_and_split_messages_and_refuses_garbage() {
        let want = request();
        let raw = want.encode_to_vec();
        // Contiguous: decoded in place, every byte consumed.
        let mut whole = &raw[..];
        assert_eq!(decode_whole::<DiffuseRequest>(&mut whole).unwrap(), want);
        assert!(whole.is_empty());
        // Split across two chunks (a varint cut in half at byte 1001): decoded from a copy.
        let mut split = Buf::chain(&raw[..1001], &raw[1001..]);
        assert_eq!(decode_whole::<DiffuseRequest>(&mut split).unwrap(), want);
        assert_eq!(split.remaining(), 0);
        // Truncated: INTERNAL, with prost's reason.
        let err = decode_whole::<DiffuseRequest>(&mut &raw[..raw.len() - 3]).unwrap_err();
        assert_eq!(err.code(), tonic::Code::Internal);
        assert!(!err.message().is_empty());
    }
}
