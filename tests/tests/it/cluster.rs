//! Real `quiver agent` processes on 127.0.0.1, spoken to only through the CLI (gRPC) and the
//! HTTP port: formation by seed, forwarding, crash and restart from disk, graceful stop, errors.

use std::time::Duration;

use quiver_tests::agents::{LocalCluster, wait_for};
use serde_json::Value;

const READY: Duration = Duration::from_secs(20);
const CONVERGE: Duration = Duration::from_secs(15);

fn names(v: &Value) -> Vec<String> {
    let mut n: Vec<String> =
        v.as_array().into_iter().flatten().filter_map(|m| m["name"].as_str().map(str::to_string)).collect();
    n.sort();
    n
}

/// A small graph file in the cluster's directory.
fn graph(c: &LocalCluster) -> String {
    let p = c.dir.path().join("g.el");
    std::fs::write(&p, "0 1\n1 2\n2 0\n2 3\n").unwrap();
    p.display().to_string()
}

fn leader_of(c: &LocalCluster, i: usize) -> Result<String, String> {
    let r = c.cli(i, &["status"]);
    if !r.status.success() {
        return Err(r.stderr.clone());
    }
    let v = r.json();
    v["leader"].as_str().map(str::to_string).ok_or_else(|| format!("no leader: {v}"))
}

fn job_ids(c: &LocalCluster, i: usize) -> Result<Vec<u64>, String> {
    let r = c.cli(i, &["job", "list"]);
    if !r.status.success() {
        return Err(r.stderr.clone());
    }
    let mut ids: Vec<u64> = r.json().as_array().into_iter().flatten().filter_map(|j| j["id"].as_u64()).collect();
    ids.sort();
    Ok(ids)
}

fn submit(c: &LocalCluster, i: usize, g: &str) -> Result<u64, String> {
    let r = c.cli(i, &["submit", g, "--algo", "pagerank", "--iterations", "5"]);
    if !r.status.success() {
        return Err(r.stderr.clone());
    }
    r.json()["id"].as_u64().ok_or_else(|| format!("no id in {}", r.stdout))
}

#[test]
fn three_agents_form_by_seed_survive_crashes_and_stop_cleanly() {
    let mut c = LocalCluster::new(&["n1", "n2", "n3"]);
    let g = graph(&c);

    // Bootstrap, then two joins through n1's peer address.
    c.agents[0].start(&["--bootstrap"]);
    c.agents[0].wait_ready(READY);
    let seed = c.agents[0].peer_addr();
    c.agents[1].start(&["--join", &seed]);
    c.agents[2].start(&["--join", &seed]);
    c.agents[1].wait_ready(READY);
    c.agents[2].wait_ready(READY);
    for i in 0..3 {
        wait_for("every member listed on every node", CONVERGE, || {
            let r = c.cli(i, &["members"]);
            let got = if r.status.success() { names(&r.json()) } else { vec![r.stderr.clone()] };
            if got == ["n1", "n2", "n3"] { Ok(()) } else { Err(format!("node {i}: {got:?}")) }
        });
    }
    // The autopilot promotes the two learners, so the cluster survives losing any one node.
    wait_for("three voters", CONVERGE, || {
        let r = c.cli(0, &["members"]);
        let v = r.json();
        let voters = v.as_array().into_iter().flatten().filter(|m| m["role"] == "voter").count();
        if voters == 3 { Ok(()) } else { Err(v.to_string()) }
    });
    let (code, metrics) = c.agents[0].http_get("/metrics").unwrap();
    assert_eq!(code, 200);
    for name in ["quiver_raft_term", "quiver_cluster_members", "quiver_raft_commit_latency_seconds"] {
        assert!(metrics.contains(name), "{name} missing from /metrics:\n{metrics}");
    }

    // A non-leader takes a submit (forwarded to the leader); every node sees the job queued.
    let leader = leader_of(&c, 0).unwrap();
    let follower = (0..3).find(|&i| c.agents[i].name != leader).unwrap();
    let id = submit(&c, follower, &g).unwrap_or_else(|e| panic!("submit through a follower: {e}\n{}", c.logs()));
    for i in 0..3 {
        wait_for("the job replicated", CONVERGE, || {
            let r = c.cli(i, &["job", "get", &id.to_string()]);
            if r.status.success() && r.json()["state"] == "queued" { Ok(()) } else { Err(r.stdout.clone() + &r.stderr) }
        });
    }

    // Bad requests get clear errors, and the node keeps serving.
    let e = c.cli(follower, &["job", "get", "999999"]).err().to_string();
    assert!(e.contains("NotFound") && e.contains("job 999999 does not exist"), "{e}");
    let e = c.cli(follower, &["submit", &g, "--algo", "ppr"]).err().to_string();
    assert!(e.contains("InvalidArgument") && e.contains("params.seeds"), "{e}");
    let e = c.cli(follower, &["submit", "/nonexistent/graph.el", "--algo", "pagerank"]).err().to_string();
    assert!(e.contains("/nonexistent/graph.el"), "{e}");
    let e = c.cli(follower, &["submit", &g, "--algo", "nosuch"]).err().to_string();
    assert!(e.contains("nosuch"), "{e}");
    let e = c.cli(follower, &["submit", &g, "--algo", "pagerank", "--iterations", "-3"]).err().to_string();
    assert!(e.contains("-3"), "{e}");
    // A message above the server's 4 MiB limit is refused by tonic, not buffered.
    let big = c.dir.path().join("big.el");
    std::fs::write(&big, "0 1\n".repeat(5 << 18)).unwrap();
    let big = big.display().to_string();
    let e = c.cli(follower, &["submit", &big, "--algo", "pagerank", "--chunk-bytes", "8388608"]).err().to_string();
    assert!(e.to_lowercase().contains("message") && e.contains("too large"), "{e}");
    assert_eq!(leader_of(&c, follower).unwrap(), leader);

    // SIGKILL a follower: writes still succeed; it restarts from its data dir with no flags.
    let victim = (0..3).find(|&i| c.agents[i].name != leader).unwrap();
    c.agents[victim].kill9();
    let survivor = (0..3).find(|&i| i != victim).unwrap();
    let id2 = submit(&c, survivor, &g).unwrap_or_else(|e| panic!("submit with a follower down: {e}\n{}", c.logs()));
    c.agents[victim].start(&[]);
    c.agents[victim].wait_ready(READY);
    wait_for("the restarted follower caught up", CONVERGE, || {
        let ids = job_ids(&c, victim)?;
        if ids.contains(&id) && ids.contains(&id2) { Ok(()) } else { Err(format!("{ids:?}")) }
    });

    // SIGKILL the leader: a survivor elects a new one and takes writes; the old leader restarts
    // from disk with its state intact.
    let li = (0..3).find(|&i| c.agents[i].name == leader).unwrap();
    c.agents[li].kill9();
    let other = (0..3).find(|&i| i != li).unwrap();
    let new_leader = wait_for("a new leader", CONVERGE, || match leader_of(&c, other) {
        Ok(l) if l != leader => Ok(l),
        Ok(l) => Err(format!("still {l}")),
        Err(e) => Err(e),
    });
    let id3 = wait_for("a submit after leader failover", CONVERGE, || submit(&c, other, &g));
    c.agents[li].start(&[]);
    c.agents[li].wait_ready(READY);
    wait_for("the old leader has every job", CONVERGE, || {
        let ids = job_ids(&c, li)?;
        if [id, id2, id3].iter().all(|j| ids.contains(j)) { Ok(()) } else { Err(format!("{ids:?}")) }
    });
    assert_eq!(job_ids(&c, li).unwrap().len(), 3, "no job lost or duplicated");
    assert_ne!(new_leader, leader);

    // Leave: a follower is removed and every remaining node stops listing it.
    let current = leader_of(&c, li).unwrap_or_default();
    let leaving = (0..3).find(|&i| c.agents[i].name != current).unwrap();
    let gone = c.agents[leaving].name.clone();
    let stay = (0..3).find(|&i| i != leaving).unwrap();
    c.cli(stay, &["leave", &gone]).ok();
    for i in (0..3).filter(|&i| i != leaving) {
        wait_for("the member that left disappears", CONVERGE, || {
            let r = c.cli(i, &["members"]);
            let got = names(&r.json());
            if got.len() == 2 && !got.contains(&gone) { Ok(()) } else { Err(format!("{got:?}")) }
        });
    }
    let e = c.cli(stay, &["leave", &gone]).err().to_string();
    assert!(e.contains("not a member"), "{e}");

    // SIGTERM: graceful, exit 0.
    for i in 0..3 {
        let status = c.agents[i].sigterm(Duration::from_secs(10));
        assert!(
            status.success(),
            "{} exited with {status} after SIGTERM\n{}",
            c.agents[i].name,
            c.agents[i].log_tail()
        );
    }
}

#[test]
fn agent_refuses_a_certificate_for_another_name_and_an_empty_data_dir() {
    let mut c = LocalCluster::new(&["a1"]);
    // The certificate in a1's tls dir is for "a1"; calling the node "b1" must fail clearly.
    c.agents[0].name = "b1".into();
    c.agents[0].start(&["--bootstrap"]);
    wait_for("the agent to exit", Duration::from_secs(10), || {
        if c.agents[0].is_running() { Err("still running".into()) } else { Ok(()) }
    });
    let log = std::fs::read_to_string(&c.agents[0].log).unwrap();
    assert!(log.contains("--node-name b1"), "{log}");
    // Restarting with no flags and no cluster on disk names the way out.
    c.agents[0].name = "a1".into();
    c.agents[0].kill9();
    c.agents[0].start(&[]);
    wait_for("the agent to exit", Duration::from_secs(10), || {
        if c.agents[0].is_running() { Err("still running".into()) } else { Ok(()) }
    });
    let log = std::fs::read_to_string(&c.agents[0].log).unwrap();
    assert!(log.contains("holds no cluster"), "{log}");
}
