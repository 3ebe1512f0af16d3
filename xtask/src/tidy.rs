//! Tidy checks that run as ordinary tests (`cargo test -p xtask`): architecture rules that a
//! reviewer would otherwise have to remember.

#![cfg(test)]

use std::collections::BTreeSet;

use crate::root;

/// The Quiver crates (and selected external crates) a member depends on, in every dependency table.
fn deps_of(dir: &str) -> BTreeSet<String> {
    let text = std::fs::read_to_string(root().join(dir).join("Cargo.toml")).expect("member manifest");
    let manifest: toml::Table = text.parse().expect("valid manifest");
    let mut out = BTreeSet::new();
    for table in ["dependencies", "dev-dependencies", "build-dependencies"] {
        if let Some(deps) = manifest.get(table).and_then(|t| t.as_table()) {
            out.extend(deps.keys().cloned());
        }
    }
    out
}

fn quiver_deps(dir: &str) -> BTreeSet<String> {
    deps_of(dir).into_iter().filter(|d| d.starts_with("quiver")).collect()
}

#[test]
fn compute_depends_on_no_other_quiver_crate_and_no_network() {
    assert_eq!(quiver_deps("compute"), BTreeSet::new());
    let deps = deps_of("compute");
    for banned in ["tokio", "quinn", "tonic", "prost", "raft"] {
        assert!(!deps.contains(banned), "compute must not depend on {banned}");
    }
}

#[test]
fn coordinator_sees_no_proto_tokio_or_quinn() {
    assert_eq!(quiver_deps("coordinator"), BTreeSet::new());
    let deps = deps_of("coordinator");
    for banned in ["tokio", "quinn", "tonic", "prost"] {
        assert!(!deps.contains(banned), "coordinator must not depend on {banned}");
    }
}

#[test]
fn node_agent_depends_only_on_compute_and_proto() {
    let allowed: BTreeSet<String> = ["quiver-compute", "quiver-proto"].map(String::from).into();
    let deps = quiver_deps("node-agent");
    assert!(deps.is_subset(&allowed), "node-agent depends on {deps:?}");
}

#[test]
fn nothing_depends_on_the_daemon() {
    for member in ["proto", "compute", "coordinator", "node-agent", "tests", "chaos", "benches"] {
        assert!(!quiver_deps(member).contains("quiver"), "{member} depends on the daemon");
    }
}
