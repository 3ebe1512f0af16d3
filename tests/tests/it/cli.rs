//! The single-process CLI: `quiver graph …` and `quiver run`, through the real binary.

use quiver_tests::bin::quiver;

fn digest(dir: &std::path::Path, args: &[&str]) -> String {
    let mut full = vec!["run", "--json"];
    full.extend_from_slice(args);
    quiver(dir, &full).json()["result_digest"].as_str().expect("digest").to_string()
}

#[test]
fn every_format_and_partitioning_gives_the_same_bits() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    quiver(d, &["graph", "generate", "kronecker", "--scale", "10", "--seed", "3", "--out", "g.qcsr"]).ok();
    quiver(d, &["graph", "convert", "g.qcsr", "g.mtx"]).ok();
    quiver(d, &["graph", "convert", "g.mtx", "g.el"]).ok();
    let info = quiver(d, &["graph", "info", "g.el", "--json"]).json();
    assert_eq!(info["vertices"], 1024);
    let algos: [&[&str]; 4] = [
        &["--algo", "pagerank", "--iterations", "15"],
        &["--algo", "ppr", "--seeds", "1,2,3", "--tolerance", "1e-6"],
        &["--algo", "heat", "--seeds", "7", "--t", "2", "--iterations", "12"],
        &["--algo", "appnp", "--feature-dim", "5", "--iterations", "6"],
    ];
    for algo in algos {
        let reference = digest(d, &[&["--graph", "g.qcsr", "--threads", "2"], algo].concat());
        for graph in ["g.mtx", "g.el"] {
            assert_eq!(
                digest(d, &[&["--graph", graph, "--threads", "1"], algo].concat()),
                reference,
                "{graph} {algo:?}"
            );
        }
        for p in ["2", "3", "7"] {
            let args = [&["--graph", "g.qcsr", "--partitions", p, "--threads", "2"], algo].concat();
            assert_eq!(digest(d, &args), reference, "partitions {p} {algo:?}");
        }
    }
}

#[test]
fn run_writes_npy_and_reports_timings() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    quiver(d, &["graph", "generate", "grid", "--rows", "8", "--cols", "8", "--out", "g.mtx"]).ok();
    let r =
        quiver(d, &["run", "--graph", "g.mtx", "--algo", "appnp", "--feature-dim", "3", "--out", "x.npy", "--json"])
            .json();
    for key in ["load_seconds", "iterations", "seconds_per_iteration", "edges", "vertices", "peak_rss_bytes"] {
        assert!(!r[key].is_null(), "missing {key} in {r}");
    }
    // The set-up and the steady iterations, apart: both within the whole compute time.
    let (first, steady) =
        (r["first_iteration_seconds"].as_f64().unwrap(), r["steady_seconds_per_iteration"].as_f64().unwrap());
    assert!(first + steady <= r["compute_seconds"].as_f64().unwrap() + 1e-9, "{r}");
    let npy = std::fs::read(d.join("x.npy")).unwrap();
    assert!(npy.starts_with(b"\x93NUMPY"));
    assert!(String::from_utf8_lossy(&npy[..128]).contains("(64, 3)"));
}

#[test]
fn bad_input_is_named_and_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("bad.el"), "0 1\n1 2\n2 x\n").unwrap();
    let e = quiver(d, &["run", "--graph", "bad.el", "--algo", "pagerank"]).err().to_string();
    assert!(e.contains("bad.el") && e.contains("line 3"), "{e}");

    let e = quiver(d, &["graph", "info", "g.graphml"]).err().to_string();
    assert!(e.contains("g.graphml") && e.contains("unknown format"), "{e}");

    quiver(d, &["graph", "generate", "grid", "--rows", "4", "--cols", "4", "--out", "g.qcsr"]).ok();
    let e = quiver(d, &["run", "--graph", "g.qcsr", "--algo", "ppr", "--seeds", "99"]).err().to_string();
    assert!(e.contains("seed vertex 99"), "{e}");

    // Features of the wrong shape: 15 rows for 16 vertices.
    let mut npy = b"\x93NUMPY\x01\x00".to_vec();
    let mut header = "{'descr': '<f4', 'fortran_order': False, 'shape': (15, 2), }".to_string();
    while !(10 + header.len() + 1).is_multiple_of(64) {
        header.push(' ');
    }
    header.push('\n');
    npy.extend_from_slice(&(header.len() as u16).to_le_bytes());
    npy.extend_from_slice(header.as_bytes());
    npy.extend_from_slice(&[0u8; 15 * 2 * 4]);
    std::fs::write(d.join("f.npy"), npy).unwrap();
    let e = quiver(d, &["run", "--graph", "g.qcsr", "--algo", "appnp", "--features", "f.npy"]).err().to_string();
    assert!(e.contains("f.npy") && e.contains("16"), "{e}");

    let e = quiver(d, &["run", "--graph", "g.qcsr", "--algo", "pagerank", "--damping", "1.5"]).err().to_string();
    assert!(e.contains("damping"), "{e}");
}

/// The README's main command: a three-agent cluster in one process, two distributed jobs, each
/// checked bit for bit against the single-process run.
#[test]
fn demo_runs_a_three_node_cluster_and_matches_the_single_process_results() {
    let dir = tempfile::tempdir().unwrap();
    let out = quiver(dir.path(), &["demo", "--scale", "10", "--feature-dim", "4"]);
    let text = out.ok();
    assert!(text.contains("3 agents") && text.contains("leader n"), "{text}");
    assert_eq!(text.matches("bit-identical").count(), 2, "{text}");
    assert!(text.lines().last().unwrap_or("").starts_with("ok"), "{text}");
}
