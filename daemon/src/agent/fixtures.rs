//! Replicated-state fixtures for the agent's unit tests.

use quiver_coordinator::state::{JobSpec, MemberInfo};
use quiver_coordinator::{ClusterState, Command, Op, RequestId};

/// A member with node id `id` on a loopback address.
pub fn member(id: u64) -> MemberInfo {
    MemberInfo {
        id,
        peer_addr: format!("127.0.0.1:{}", 7000 + id),
        control_addr: String::new(),
        cores: 2,
        memory_bytes: 1 << 30,
    }
}

/// A PageRank job spec held by `holders`.
pub fn job_spec(holders: Vec<u64>) -> JobSpec {
    JobSpec {
        name: "pr".into(),
        kernel: "pagerank".into(),
        params: vec![],
        iterations: 10,
        feature_width: 1,
        partitions: vec![],
        holders,
    }
}

/// Applies `op` at log index `index` (also the request's sequence number).
pub fn apply(s: &mut ClusterState, index: u64, op: Op) {
    s.apply(index, &Command { request: RequestId { client: 1, seq: index }, op });
}
