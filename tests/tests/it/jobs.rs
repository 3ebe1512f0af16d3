//! Distributed jobs on three real `quiver agent` processes, spoken to only through the CLI:
//! results equal to `quiver run` bit for bit for every algorithm on 1, 2 and 3 nodes, upload and
//! by-path submits, watch, result download, cancel, and bad input that leaves the cluster serving.

use std::time::Duration;

use quiver_tests::agents::{LocalCluster, wait_for};
use quiver_tests::bin::quiver;
use serde_json::Value;

const READY: Duration = Duration::from_secs(20);
const CONVERGE: Duration = Duration::from_secs(15);

fn formed_cluster() -> LocalCluster {
    let mut c = LocalCluster::new(&["j1", "j2", "j3"]);
    c.form(READY);
    c
}

/// `quiver run --json`'s result digest for the same graph and parameters.
fn reference(c: &LocalCluster, graph: &str, algo: &[&str]) -> String {
    let mut args = vec!["run", "--graph", graph, "--json"];
    args.extend_from_slice(algo);
    let v = quiver(c.dir.path(), &args).json();
    v["result_digest"].as_str().expect("digest").to_string()
}

/// A Kronecker graph of `scale` generated from `seed` as `DIR/k.qcsr`; its path.
fn kronecker(dir: &std::path::Path, scale: &str, seed: &str) -> String {
    let g = dir.join("k.qcsr").display().to_string();
    quiver(dir, &["graph", "generate", "kronecker", "--scale", scale, "--seed", seed, "--out", &g]).ok();
    g
}

/// `quiver submit ARGS` through node `node` (without waiting); the job's id.
fn submit_id(c: &LocalCluster, node: usize, args: &[&str]) -> String {
    let mut all = vec!["submit"];
    all.extend_from_slice(args);
    let r = c.cli(node, &all);
    assert!(r.status.success(), "{}", r.stderr);
    r.json()["id"].as_u64().unwrap().to_string()
}

fn submit_wait(c: &LocalCluster, node: usize, args: &[&str]) -> Value {
    let mut all = vec!["submit"];
    all.extend_from_slice(args);
    all.push("--wait");
    let r = c.cli(node, &all);
    assert!(r.status.success(), "submit {args:?} failed: {}\n{}", r.stderr, c.logs());
    r.json()
}

#[test]
fn distributed_jobs_match_quiver_run_and_bad_input_leaves_the_cluster_serving() {
    let c = formed_cluster();
    let dir = c.dir.path();
    let g = kronecker(dir, "10", "3");
    let el = dir.join("k.el").display().to_string();
    quiver(dir, &["graph", "convert", &g, &el]).ok();

    let algos: [&[&str]; 4] = [
        &["--algo", "pagerank", "--iterations", "15"],
        &["--algo", "ppr", "--seeds", "1,17,300", "--tolerance", "1e-7", "--max-iterations", "60"],
        &["--algo", "heat", "--seeds", "5", "--t", "3", "--iterations", "12"],
        &["--algo", "appnp", "--feature-dim", "8", "--alpha", "0.15", "--iterations", "6"],
    ];
    let mut last = 0;
    for (i, algo) in algos.iter().enumerate() {
        let want = reference(&c, &g, algo);
        for parts in ["1", "2", "3"] {
            // Alternate the node that takes the submit, and upload vs. by-path.
            let node = (i + parts.len() + last) % 3;
            let mut args = vec![if parts == "2" { el.as_str() } else { g.as_str() }, "--partitions", parts];
            if parts == "3" {
                args.push("--by-path");
            }
            args.extend_from_slice(algo);
            let v = submit_wait(&c, node, &args);
            assert_eq!(v["state"], "succeeded", "{v}");
            assert_eq!(v["result_digest"], want.as_str(), "{algo:?} on {parts} partitions: {v}");
            last = v["id"].as_u64().unwrap() as usize;
        }
    }

    // Jobs after the first on the same graph file and partition count found their partitions
    // kept by the owners of an earlier one (and still matched `quiver run` above).
    let hits: f64 = (0..3)
        .map(|i| {
            let (_, m) = c.agents[i].http_get("/metrics").unwrap_or_default();
            m.lines()
                .filter(|l| l.starts_with("quiver_job_partition_cache_hits_total"))
                .filter_map(|l| l.split_whitespace().last()?.parse::<f64>().ok())
                .sum::<f64>()
        })
        .sum();
    assert!(hits > 0.0, "no job used a kept partition");

    // The result downloads from any node and equals `quiver run --out` byte for byte.
    let id = last.to_string();
    let mine = dir.join("mine.npy");
    let mut run = vec!["run", "--graph", g.as_str(), "--out", mine.to_str().unwrap()];
    run.extend_from_slice(algos[3]);
    quiver(dir, &run).ok();
    for node in 0..3 {
        let out = dir.join(format!("result-{node}.npy"));
        c.cli(node, &["result", &id, "--out", out.to_str().unwrap()]).ok();
        assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&mine).unwrap(), "result via node {node}");
    }
    let w = c.cli(1, &["job", "watch", &id]);
    assert!(w.status.success(), "{}", w.stderr);
    assert_eq!(w.json()["state"], "succeeded");

    // Bad input: clear errors naming the field, nothing recorded.
    let bad = dir.join("bad.el");
    std::fs::write(&bad, "0 1\n1 two\n").unwrap();
    let e = c.cli(0, &["submit", bad.to_str().unwrap(), "--algo", "pagerank"]).err().to_string();
    assert!(e.contains("InvalidArgument") && e.contains("graph") && e.contains("line 2"), "{e}");
    let e = c.cli(1, &["submit", &g, "--algo", "ppr", "--seeds", "99999"]).err().to_string();
    assert!(e.contains("InvalidArgument") && e.contains("params.seeds") && e.contains("99999"), "{e}");
    let feats = dir.join("feats.npy");
    quiver(dir, &["run", "--graph", &el, "--algo", "pagerank", "--iterations", "1", "--out", feats.to_str().unwrap()])
        .ok();
    let e = c
        .cli(2, &["submit", &g, "--algo", "appnp", "--features", feats.to_str().unwrap(), "--iterations", "2"])
        .err()
        .to_string();
    assert!(e.contains("InvalidArgument") && e.contains("params.features_path"), "{e}");

    // Cancel: a long job stops on every node; watch reports it; the cluster runs the next job.
    let r = c.cli(0, &["submit", &g, "--algo", "pagerank", "--iterations", "1000000", "--partitions", "3"]);
    let long = r.json()["id"].as_u64().expect("id").to_string();
    wait_for("the long job running", CONVERGE, || {
        let v = c.cli(0, &["job", "get", &long]).json();
        if v["state"] == "running" && v["superstep"].as_u64().unwrap_or(0) > 0 { Ok(()) } else { Err(v.to_string()) }
    });
    c.cli(2, &["job", "cancel", &long]).ok();
    let w = c.cli(1, &["job", "watch", &long]);
    assert!(!w.status.success() && w.stderr.contains("cancelled"), "{}", w.stderr);
    wait_for("every node dropped the cancelled job's partitions", CONVERGE, || {
        let busy: Vec<usize> = (0..3)
            .filter(|&i| {
                let (_, m) = c.agents[i].http_get("/metrics").unwrap_or_default();
                m.lines().any(|l| l.starts_with("quiver_job_partitions_running") && !l.ends_with(" 0"))
            })
            .collect();
        if busy.is_empty() { Ok(()) } else { Err(format!("nodes {busy:?} still run partitions")) }
    });
    let mut again = vec![g.as_str()];
    again.extend_from_slice(algos[0]);
    let v = submit_wait(&c, 2, &again);
    assert_eq!(v["result_digest"], reference(&c, &g, algos[0]).as_str());
}

/// A worker SIGKILLed mid-job: its partition is re-placed on a survivor in a new epoch, every
/// owner rolls back to the last checkpoint, and the result is still `quiver run`'s, bit for bit.
#[test]
fn a_job_survives_losing_a_worker_with_the_undisturbed_result() {
    let mut c = formed_cluster();
    let dir = c.dir.path().to_path_buf();
    let g = kronecker(&dir, "11", "7");
    let algo: &[&str] = &["--algo", "pagerank", "--iterations", "600"];
    let want = reference(&c, &g, algo);
    let mut args = vec![g.as_str(), "--partitions", "3", "--checkpoint-every", "20"];
    args.extend_from_slice(algo);
    let id = submit_id(&c, 0, &args);
    // Wait for a checkpoint to be recorded and the job to be well past it, then kill a worker
    // that is not the job's holder (node 0 took the submit).
    wait_for("the job past its first checkpoints", CONVERGE * 4, || {
        let v = c.cli(0, &["job", "get", &id]).json();
        if v["superstep"].as_u64().unwrap_or(0) >= 50 { Ok(()) } else { Err(v.to_string()) }
    });
    c.agents[2].kill9();
    let w = c.cli(0, &["job", "watch", &id]);
    assert!(w.status.success(), "the job did not survive: {}\n{}", w.stderr, c.logs());
    let v = w.json();
    assert_eq!(v["result_digest"], want.as_str(), "{v}");
    assert!(v["epoch"].as_u64().unwrap() >= 2, "the job was not re-placed in a new epoch: {v}");
}

/// A by-path graph rewritten in place mid-job (as `cp` does: the same inode, truncated and
/// rewritten) is not read through the holder's old mapping when a lost worker forces a new epoch:
/// the job fails and says the file changed, and the cluster goes on serving.
#[test]
fn a_by_path_graph_rewritten_mid_job_fails_the_job_with_the_reason() {
    let mut c = formed_cluster();
    let dir = c.dir.path().to_path_buf();
    let g = kronecker(&dir, "11", "7");
    let other = dir.join("other.qcsr").display().to_string();
    quiver(&dir, &["graph", "generate", "kronecker", "--scale", "11", "--seed", "8", "--out", &other]).ok();
    let algo = ["--algo", "pagerank", "--iterations", "600"];
    rewrite_mid_job_then_lose_an_owner(&mut c, &g, &["--by-path"], &algo, &g, &std::fs::read(&other).unwrap());
    // The holder is alive and takes the rewritten file as a new graph.
    let v = submit_wait(&c, 0, &[g.as_str(), "--by-path", "--algo", "pagerank", "--iterations", "5"]);
    assert_eq!(v["state"], "succeeded", "{v}");
}

/// The same for an APPNP features file named by path, rewritten with the same shape and other
/// values: the next epoch would map the new values, so it fails the job instead.
#[test]
fn a_features_file_rewritten_mid_job_fails_the_job_with_the_reason() {
    let mut c = formed_cluster();
    let dir = c.dir.path().to_path_buf();
    let g = kronecker(&dir, "11", "7");
    let feats = |name: &str, iterations: &str| {
        let out = dir.join(name).display().to_string();
        quiver(
            &dir,
            &["run", "--graph", &g, "--algo", "appnp", "--feature-dim", "3", "--iterations", iterations, "--out", &out],
        )
        .ok();
        out
    };
    let (f, other) = (feats("feats.npy", "2"), feats("other.npy", "3"));
    let algo = ["--algo", "appnp", "--features", f.as_str(), "--alpha", "0.1", "--iterations", "600"];
    rewrite_mid_job_then_lose_an_owner(&mut c, &g, &[], &algo, &f, &std::fs::read(&other).unwrap());
}

/// Submits `graph` in 3 partitions through agent 0 with `how` and `algo`, rewrites `file` in
/// place with `bytes` once the job is past its first checkpoints, SIGKILLs agent 2 (an owner) to
/// force a new epoch, and checks that the job fails naming the change.
fn rewrite_mid_job_then_lose_an_owner(
    c: &mut LocalCluster,
    graph: &str,
    how: &[&str],
    algo: &[&str],
    file: &str,
    bytes: &[u8],
) {
    let mut args = vec![graph, "--partitions", "3", "--checkpoint-every", "20"];
    args.extend_from_slice(how);
    args.extend_from_slice(algo);
    let id = submit_id(c, 0, &args);
    wait_for("the job past its first checkpoints", CONVERGE * 4, || {
        let v = c.cli(0, &["job", "get", &id]).json();
        if v["superstep"].as_u64().unwrap_or(0) >= 50 { Ok(()) } else { Err(v.to_string()) }
    });
    std::fs::write(file, bytes).unwrap();
    c.agents[2].kill9();
    let w = c.cli(0, &["job", "watch", &id]);
    assert!(!w.status.success(), "the job finished on a changed {file}: {}\n{}", w.stdout, c.logs());
    assert!(
        w.stderr.contains(file) && w.stderr.contains("changed since the job was submitted"),
        "{}\n{}",
        w.stderr,
        c.logs()
    );
}

/// The job's holder (it took the submit, keeps the graph and the checkpoints, and here also
/// leads) is SIGKILLed mid-job and restarted from its data dir: it takes a new epoch, resumes from
/// its last checkpoint, and the result is still `quiver run`'s.
#[test]
fn a_job_survives_its_holder_restarting_from_disk() {
    let mut c = formed_cluster();
    let dir = c.dir.path().to_path_buf();
    let g = kronecker(&dir, "11", "8");
    let algo: &[&str] = &["--algo", "heat", "--seeds", "3,99", "--t", "5", "--iterations", "500"];
    let want = reference(&c, &g, algo);
    let mut args = vec![g.as_str(), "--partitions", "3", "--checkpoint-every", "25", "--by-path"];
    args.extend_from_slice(algo);
    let id = submit_id(&c, 0, &args);
    wait_for("the job past a checkpoint", CONVERGE * 4, || {
        let v = c.cli(1, &["job", "get", &id]).json();
        if v["superstep"].as_u64().unwrap_or(0) >= 60 || v["state"] != "running" { Ok(()) } else { Err(v.to_string()) }
    });
    c.agents[0].kill9();
    c.agents[0].start(&[]);
    c.agents[0].wait_ready(READY);
    let w = c.cli(1, &["job", "watch", &id]);
    assert!(w.status.success(), "the job did not survive: {}\n{}", w.stderr, c.logs());
    let v = w.json();
    assert_eq!(v["result_digest"], want.as_str(), "{v}");
}

/// The job's graph, features file and checkpoints live on two holders: when the node that took the submit (and
/// masters the job, and here also leads) is SIGKILLed for good mid-job, the second holder takes
/// the job over in a new epoch from the last checkpoint it was sent, and the result is still
/// `quiver run`'s, fetched through a survivor.
#[test]
fn a_job_survives_losing_its_holder_for_good() {
    let mut c = formed_cluster();
    let dir = c.dir.path().to_path_buf();
    let g = kronecker(&dir, "11", "9");
    // APPNP over a features file named by path: the second holder needs its own copy of that too.
    let feats = dir.join("feats.npy").display().to_string();
    quiver(
        &dir,
        &["run", "--graph", &g, "--algo", "appnp", "--feature-dim", "3", "--iterations", "2", "--out", &feats],
    )
    .ok();
    let algo: &[&str] = &["--algo", "appnp", "--features", &feats, "--alpha", "0.1", "--iterations", "500"];
    let want = reference(&c, &g, algo);
    let mut args = vec![g.as_str(), "--partitions", "3", "--checkpoint-every", "25"];
    args.extend_from_slice(algo);
    let id = submit_id(&c, 0, &args);
    // The second holder is recorded once its copy of the graph and features is stored.
    let job = wait_for("a second holder", CONVERGE, || {
        let job = c.cli(1, &["job", "get", &id]).json();
        if job["holders"].as_array().is_some_and(|h| h.len() == 2) { Ok(job) } else { Err(job.to_string()) }
    });
    let holders: Vec<u64> = job["holders"].as_array().unwrap().iter().map(|h| h.as_u64().unwrap()).collect();
    assert_eq!(job["master"].as_u64(), Some(holders[0]), "the submitting node masters first: {job}");
    // A non-master reports the last checkpoint's superstep: past 60 means one is recorded.
    wait_for("the job past a checkpoint", CONVERGE * 4, || {
        let v = c.cli(1, &["job", "get", &id]).json();
        if v["superstep"].as_u64().unwrap_or(0) >= 60 || v["state"] != "running" { Ok(()) } else { Err(v.to_string()) }
    });
    c.agents[0].kill9();
    let w = c.cli(1, &["job", "watch", &id]);
    assert!(w.status.success(), "the job did not survive its holder: {}\n{}", w.stderr, c.logs());
    let v = w.json();
    assert_eq!(v["result_digest"], want.as_str(), "{v}");
    let after = c.cli(2, &["job", "get", &id]).json();
    assert_eq!(after["master"].as_u64(), Some(holders[1]), "the second holder took the job over: {after}");
    let (out, mine) = (dir.join("r.npy"), dir.join("mine.npy"));
    let mut run = vec!["run", "--graph", g.as_str(), "--out", mine.to_str().unwrap()];
    run.extend_from_slice(algo);
    quiver(&dir, &run).ok();
    let r = c.cli(2, &["result", &id, "--out", out.to_str().unwrap()]);
    assert!(r.status.success(), "fetching the result through a survivor: {}", r.stderr);
    assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&mine).unwrap(), "the result equals quiver run --out");
}
