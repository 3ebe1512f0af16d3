//! The short chaos set that CI runs: three drills that do not depend on job recovery, one seed
//! each, through the real CLI (`quiver chaos run --drill X --seed 1 --json`). Each drill starts
//! its own cluster on loopback and ends by itself; the whole set takes well under a minute here.
//! The full set (every drill, 20 seeds) is `cargo xtask chaos`.

use quiver_tests::bin::quiver;

fn drill(name: &str) {
    let dir = tempfile::tempdir().expect("temp dir");
    let r = quiver(dir.path(), &["chaos", "run", "--drill", name, "--seed", "1", "--json"]);
    assert!(r.status.success(), "drill {name} failed:\n{}\n{}", r.stdout, r.stderr);
    let v = r.json();
    assert_eq!(v["passed"], true, "{v}");
    let d = &v["drills"][0];
    assert_eq!(d["drill"], name, "{v}");
    let checks = d["checks"].as_array().expect("checks");
    for want in ["membership_converged", "acknowledged_writes_exactly_once", "one_leader_per_term"] {
        assert!(checks.iter().any(|c| c["name"] == want && c["ok"] == true), "{want} missing or failed: {v}");
    }
    assert!(d["recovery_serving_ms"].as_f64().is_some(), "no recovery time: {v}");
    assert!(d["acknowledged_writes"].as_u64().unwrap_or(0) >= 6, "too few writes: {v}");
}

#[test]
fn chaos_leader_sigkill_under_writes() {
    drill("leader-kill");
}

#[test]
fn chaos_leader_sigstop_five_seconds() {
    drill("leader-stop");
}

#[test]
fn chaos_full_cluster_sigkill_and_restart_from_disk() {
    drill("full-restart");
}

#[test]
fn chaos_run_refuses_an_unknown_drill() {
    let dir = tempfile::tempdir().expect("temp dir");
    let e = quiver(dir.path(), &["chaos", "run", "--drill", "no-such-drill"]).err().to_string();
    assert!(e.contains("no-such-drill") && e.contains("leader-kill"), "{e}");
}
