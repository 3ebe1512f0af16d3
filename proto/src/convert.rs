//! Every conversion between wire types and domain types, in one place.
//!
//! Wire enums arrive as `i32`s that a peer or caller chose; nothing here trusts them. Each
//! conversion either yields a valid domain value or a [`ConvertError`] naming the field and the value.

use quiver_compute::Pod;

use crate::peer::{ElemType, StreamKind};

/// A wire value that has no domain meaning.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConvertError {
    /// An enum field holds a number this version does not know (or the `UNSPECIFIED` zero).
    #[error("{field}: unknown or unspecified value {value}")]
    UnknownEnum { field: &'static str, value: i32 },
}

impl ElemType {
    /// The wire element type for a compute element type.
    pub fn of<T: Pod>() -> ElemType {
        match T::NAME {
            "u8" => ElemType::U8,
            "u32" => ElemType::U32,
            "u64" => ElemType::U64,
            "f32" => ElemType::F32,
            "f64" => ElemType::F64,
            // `Pod` is sealed in quiver-compute; a new element type there must be added here.
            other => unreachable!("element type {other} has no wire representation"),
        }
    }

    /// Width of one element in bytes (`None` for `UNSPECIFIED`).
    pub fn width(self) -> Option<usize> {
        match self {
            ElemType::Unspecified => None,
            ElemType::U8 => Some(1),
            ElemType::U32 | ElemType::F32 => Some(4),
            ElemType::U64 | ElemType::F64 => Some(8),
        }
    }

    /// Whether values of this wire type may be viewed as `T`.
    pub fn matches<T: Pod>(self) -> bool {
        self == ElemType::of::<T>()
    }

    /// Reads an element type from a wire field, refusing unknown and unspecified values.
    pub fn from_wire(value: i32) -> Result<ElemType, ConvertError> {
        match ElemType::try_from(value) {
            Ok(ElemType::Unspecified) | Err(_) => Err(ConvertError::UnknownEnum { field: "segment.elem", value }),
            Ok(t) => Ok(t),
        }
    }
}

impl StreamKind {
    /// Reads a stream kind from a wire field, refusing unknown and unspecified values.
    pub fn from_wire(value: i32) -> Result<StreamKind, ConvertError> {
        match StreamKind::try_from(value) {
            Ok(StreamKind::Unspecified) | Err(_) => {
                Err(ConvertError::UnknownEnum { field: "stream_header.kind", value })
            }
            Ok(k) => Ok(k),
        }
    }

    /// Whether the stream carries zero-copy frames (bulk) rather than length-delimited messages.
    pub fn is_bulk(self) -> bool {
        matches!(self, StreamKind::PartitionPush | StreamKind::HaloExchange)
    }

    /// Whether the stream is bidirectional (request and answer on the same stream).
    pub fn is_bidirectional(self) -> bool {
        matches!(
            self,
            StreamKind::Control
                | StreamKind::Heartbeat
                | StreamKind::ServingForward
                | StreamKind::Job
                | StreamKind::Replica
        )
    }
}

/// Vertex ids as `DiffuseRequest.sources_le` / `targets_le` carry them: little-endian `u32`s.
pub fn pack_ids(ids: &[u32]) -> Vec<u8> {
    ids.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// The ids of a packed field ([`pack_ids`]); `None` when its length is not whole 4-byte ids.
pub fn unpack_ids(bytes: &[u8]) -> Option<Vec<u32>> {
    bytes
        .len()
        .is_multiple_of(4)
        .then(|| bytes.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
}

impl crate::control::DiffuseRequest {
    /// Moves the edge list from `sources` / `targets` into the packed fields, the form that costs
    /// client and server a copy instead of a varint per id.
    pub fn pack_edges(&mut self) {
        self.sources_le = pack_ids(&std::mem::take(&mut self.sources));
        self.targets_le = pack_ids(&std::mem::take(&mut self.targets));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn elem_types_round_trip_with_compute() {
        assert_eq!(ElemType::of::<u8>().width(), Some(1));
        assert_eq!(ElemType::of::<u32>(), ElemType::U32);
        assert_eq!(ElemType::of::<f64>().width(), Some(8));
        assert!(ElemType::F32.matches::<f32>());
        assert!(!ElemType::F32.matches::<u32>());
    }

    #[test]
    fn unknown_wire_values_are_refused() {
        assert_eq!(ElemType::from_wire(2), Ok(ElemType::U32));
        assert!(ElemType::from_wire(0).is_err());
        assert!(ElemType::from_wire(99).is_err());
        assert!(StreamKind::from_wire(-1).is_err());
        assert_eq!(StreamKind::from_wire(4), Ok(StreamKind::PartitionPush));
        let e = StreamKind::from_wire(42).unwrap_err();
        assert_eq!(e.to_string(), "stream_header.kind: unknown or unspecified value 42");
    }
}
