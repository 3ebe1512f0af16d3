//! How a member's name travels in the replicated state.
//!
//! The coordinator's `MemberInfo` has no name field (names are a daemon concern; the coordinator
//! only knows ids), so the agent appends its name to the control-plane address it reports:
//! `127.0.0.1:7401#n1`. These two functions are the only place that knows the format.

/// `addr#name`.
pub fn encode_control_addr(addr: &str, name: &str) -> String {
    format!("{addr}#{name}")
}

/// Splits `addr#name` into the address and the name; a member that reported no name is called
/// `node-<id>`.
pub fn decode_control_addr(id: u64, text: &str) -> (String, String) {
    match text.split_once('#') {
        Some((addr, name)) if !name.is_empty() => (addr.to_string(), name.to_string()),
        Some((addr, _)) => (addr.to_string(), format!("node-{id}")),
        None => (text.to_string(), format!("node-{id}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_fallback() {
        let s = encode_control_addr("127.0.0.1:7401", "n1");
        assert_eq!(decode_control_addr(5, &s), ("127.0.0.1:7401".into(), "n1".into()));
        assert_eq!(decode_control_addr(5, "10.0.0.1:1"), ("10.0.0.1:1".into(), "node-5".into()));
    }
}
