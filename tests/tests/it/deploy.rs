//! deploy/prometheus and deploy/grafana against a real agent: `promtool` accepts the rules and the
//! scrape config, and every metric the rules and the dashboard query is one the agent exports —
//! read from a live `/metrics` after two agents formed a cluster, ran a job and served requests.
//! (The other deploy/ files are checked by xtask's tidy tests and `cargo xtask compose-test`.)

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use quiver_proto::control::diffusion_client::DiffusionClient;
use quiver_proto::control::{DiffuseRequest, Kernel, KernelParams};
use quiver_tests::agents::{LocalCluster, wait_for};
use quiver_tests::bin::quiver;

const READY: Duration = Duration::from_secs(20);

fn deploy(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").join("deploy").join(rel)
}

/// Every `quiver_…` metric name in `text`, with the histogram series suffixes removed.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while let Some(at) = text[i..].find("quiver_") {
        let start = i + at;
        let boundary = start == 0 || !(bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_');
        let mut end = start;
        while end < bytes.len() && (bytes[end].is_ascii_alphanumeric() || bytes[end] == b'_') {
            end += 1;
        }
        if boundary {
            let name = &text[start..end];
            let base = ["_bucket", "_sum", "_count"].iter().find_map(|s| name.strip_suffix(s)).unwrap_or(name);
            out.insert(base.to_string());
        }
        i = end.max(start + 1);
    }
    out
}

/// The metric names a live `/metrics` exports (series names, histogram suffixes removed).
fn exported(body: &str) -> BTreeSet<String> {
    metric_names(&body.lines().filter(|l| !l.starts_with('#')).collect::<Vec<_>>().join("\n"))
}

fn promtool(args: &[&str]) -> Option<(bool, String)> {
    let out = Command::new("promtool").args(args).output().ok()?;
    Some((
        out.status.success(),
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)),
    ))
}

#[test]
fn prometheus_rules_and_config_pass_promtool() {
    let rules = deploy("prometheus/alerts.yml");
    let config = deploy("prometheus/prometheus.yml");
    let Some((ok, said)) = promtool(&["check", "rules", rules.to_str().unwrap()]) else {
        // .ci/run installs Debian's `prometheus` package (which has promtool) when apt works.
        eprintln!("SKIPPED promtool checks: promtool not found (apt-get install prometheus)");
        return;
    };
    assert!(ok, "promtool check rules: {said}");
    let (ok, said) = promtool(&["check", "config", config.to_str().unwrap()]).expect("promtool ran once");
    assert!(ok, "promtool check config: {said}");
    // Each alert the operators asked for exists.
    let text = std::fs::read_to_string(&rules).unwrap();
    for alert in [
        "QuiverNoLeader",
        "QuiverFrequentLeaderChanges",
        "QuiverNodeDown",
        "QuiverJobStalled",
        "QuiverServeLatencyHigh",
        "QuiverRaftFsyncSlow",
    ] {
        assert!(text.contains(&format!("alert: {alert}\n")), "alerts.yml has no {alert}");
    }
}

#[test]
fn rules_and_dashboard_query_only_metrics_a_live_agent_exports() {
    let rules = std::fs::read_to_string(deploy("prometheus/alerts.yml")).unwrap();
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(deploy("grafana/quiver.json")).unwrap()).expect("dashboard JSON");
    let mut dash_exprs = String::new();
    let panels = dashboard["panels"].as_array().expect("panels");
    for p in panels.iter().filter(|p| p["type"] != "row") {
        let targets = p["targets"].as_array().unwrap_or_else(|| panic!("panel {} has no targets", p["title"]));
        assert!(!targets.is_empty(), "panel {} has no queries", p["title"]);
        for t in targets {
            dash_exprs.push_str(t["expr"].as_str().expect("a PromQL expr"));
            dash_exprs.push('\n');
        }
    }
    let used_rules = metric_names(&rules);
    let used_dash = metric_names(&dash_exprs);
    assert!(used_rules.len() >= 6 && used_dash.len() >= 15, "{used_rules:?} {used_dash:?}");

    // Two agents (so the QUIC metrics exist), one job over both, a served request twice
    // (a cache miss, then a hit).
    let mut c = LocalCluster::new(&["p1", "p2"]);
    c.agents[0].start(&["--bootstrap"]);
    c.agents[0].wait_ready(READY);
    let seed = c.agents[0].peer_addr();
    c.agents[1].start(&["--join", &seed]);
    c.agents[1].wait_ready(READY);
    let dir = c.dir.path();
    let g = dir.join("g.qcsr").display().to_string();
    quiver(dir, &["graph", "generate", "kronecker", "--scale", "8", "--seed", "2", "--out", &g]).ok();
    let r = c.cli(0, &["submit", &g, "--algo", "pagerank", "--iterations", "5", "--partitions", "2", "--wait"]);
    assert!(r.status.success(), "submit failed: {}\n{}", r.stderr, c.logs());
    diffuse_twice(&c);

    let wanted: BTreeSet<String> = used_rules.union(&used_dash).cloned().collect();
    let mut last = BTreeSet::new();
    wait_for("every queried metric on /metrics", Duration::from_secs(15), || {
        let mut have = BTreeSet::new();
        for a in &c.agents {
            let (code, body) = a.http_get("/metrics")?;
            if code != 200 {
                return Err(format!("/metrics answered {code}"));
            }
            have.extend(exported(&body));
        }
        last = wanted.difference(&have).cloned().collect();
        if last.is_empty() { Ok(()) } else { Err(format!("missing {last:?}")) }
    });
}

/// One `Diffuse` request, sent twice to agent 0.
fn diffuse_twice(c: &LocalCluster) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let mut client = DiffusionClient::new(crate::grpc(c, 0).await);
        let req = DiffuseRequest {
            vertices: 4,
            sources: vec![0, 1, 2, 3],
            targets: vec![1, 2, 3, 0],
            params: Some(KernelParams {
                kernel: Kernel::Pagerank as i32,
                alpha: 0.85,
                max_iterations: 10,
                ..Default::default()
            }),
            ..Default::default()
        };
        for _ in 0..2 {
            client.diffuse(req.clone()).await.expect("Diffuse");
        }
    });
}

#[test]
fn metric_names_strip_histogram_suffixes_and_respect_word_boundaries() {
    let names = metric_names("rate(quiver_a_seconds_bucket[5m]) + xquiver_b + quiver_c_total{x=\"quiver_d\"}");
    let want: BTreeSet<String> = ["quiver_a_seconds", "quiver_c_total", "quiver_d"].map(String::from).into();
    assert_eq!(names, want);
}
