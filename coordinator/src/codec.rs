//! Encoding of what the coordinator puts into Raft: commands (entry data) and state snapshots.
//!
//! Format: one magic byte and a version byte, then the value in postcard (serde, varint-compact,
//! with a stable documented wire format). Postcard keeps 10,000 jobs well under a megabyte and
//! decodes them in milliseconds; the header lets a later version change the layout.
//!
//! Raft's own messages are *not* encoded here: they are rust-protobuf 2 types that travel as opaque
//! bytes and are parsed only in [`CoordinatorCore::step`](crate::CoordinatorCore::step).

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::state::{ClusterState, Command};

const COMMAND_MAGIC: u8 = 0xC1;
const SNAPSHOT_MAGIC: u8 = 0x5A;
const VERSION: u8 = 1;

/// A value that did not decode.
#[derive(Debug, thiserror::Error)]
#[error("{what}: {reason}")]
pub struct DecodeError {
    /// What was being decoded.
    pub what: &'static str,
    /// Why it failed.
    pub reason: String,
}

fn encode<T: Serialize>(magic: u8, value: &T) -> Vec<u8> {
    let out = vec![magic, VERSION];
    // Serialising plain data structs into a Vec cannot fail; an error would be a serde bug.
    match postcard::to_extend(value, out) {
        Ok(out) => out,
        Err(_) => vec![magic, VERSION],
    }
}

fn decode<T: DeserializeOwned>(magic: u8, what: &'static str, bytes: &[u8]) -> Result<T, DecodeError> {
    match bytes {
        [m, v, body @ ..] if *m == magic && *v == VERSION => {
            postcard::from_bytes(body).map_err(|e| DecodeError { what, reason: e.to_string() })
        }
        [m, v, ..] if *m == magic => DecodeError::err(what, format!("unsupported version {v}")),
        _ => DecodeError::err(what, "missing header".into()),
    }
}

impl DecodeError {
    fn err<T>(what: &'static str, reason: String) -> Result<T, Self> {
        Err(DecodeError { what, reason })
    }
}

/// Encodes a command as Raft entry data.
pub fn encode_command(cmd: &Command) -> Vec<u8> {
    encode(COMMAND_MAGIC, cmd)
}

/// Decodes Raft entry data into a command.
pub fn decode_command(bytes: &[u8]) -> Result<Command, DecodeError> {
    decode(COMMAND_MAGIC, "command", bytes)
}

/// Encodes the whole state machine for a snapshot.
pub fn encode_state(state: &ClusterState) -> Vec<u8> {
    encode(SNAPSHOT_MAGIC, state)
}

/// Decodes a snapshot's data into the state machine.
pub fn decode_state(bytes: &[u8]) -> Result<ClusterState, DecodeError> {
    decode(SNAPSHOT_MAGIC, "snapshot", bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{MemberInfo, Op, RequestId};

    #[test]
    fn command_and_state_round_trip() {
        let info = MemberInfo { id: 3, peer_addr: "a:1".into(), control_addr: "a:2".into(), cores: 2, memory_bytes: 9 };
        let cmd = Command { request: RequestId { client: 5, seq: 6 }, op: Op::Join(info.clone()) };
        assert_eq!(decode_command(&encode_command(&cmd)).ok(), Some(cmd.clone()));
        let mut state = ClusterState::bootstrap(&[info], &[3]);
        state.apply(7, &cmd);
        assert_eq!(decode_state(&encode_state(&state)).ok(), Some(state));
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(decode_command(&[]).is_err());
        assert!(decode_command(&[COMMAND_MAGIC, 9, 1]).is_err());
        assert!(decode_state(&[SNAPSHOT_MAGIC, VERSION, 0xff, 0xff, 0xff]).is_err());
    }
}
