//! The operator's web view (`/ui` on the HTTP port) against a running 3-agent cluster, in
//! headless Chromium (Debian's `chromium` package): the page loads and shows the three members
//! and a job with its progress and placement. The screenshot is kept as an artefact:
//! `target/artefacts/ui.png`. Without Chromium the browser half is skipped with a message (the
//! JSON half still runs); `.ci/run` installs it when apt is available.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use quiver_tests::agents::{LocalCluster, poll};
use quiver_tests::bin::quiver;
use serde_json::Value;

const READY: Duration = Duration::from_secs(20);
/// Chromium gets this long per run before it is killed.
const BROWSER_WITHIN: Duration = Duration::from_secs(60);

fn chromium() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("QUIVER_CHROMIUM") {
        return Some(PathBuf::from(p));
    }
    ["chromium", "chromium-browser", "google-chrome"].iter().find_map(|name| {
        let out = Command::new("which").arg(name).output().ok()?;
        out.status.success().then(|| PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
    })
}

/// Runs headless Chromium with `args` against `url`; its stdout. Killed after [`BROWSER_WITHIN`].
fn browse(bin: &Path, profile: &Path, args: &[String], url: &str) -> String {
    let mut child = Command::new(bin)
        .args(["--headless", "--disable-gpu", "--no-sandbox", "--hide-scrollbars", "--window-size=1200,900"])
        .args(["--no-first-run", "--disable-extensions", "--virtual-time-budget=3000"])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .arg(url)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting chromium");
    let finished = poll("chromium to finish", BROWSER_WITHIN, || {
        child.try_wait().expect("waiting for chromium").ok_or_else(|| "still running".to_string())
    });
    if let Err(e) = finished {
        let _ = child.kill();
        let _ = child.wait();
        panic!("{e}");
    }
    let out = child.wait_with_output().expect("chromium output");
    assert!(out.status.success(), "chromium failed: {}", out.status);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn web_view_shows_members_jobs_and_placement_in_headless_chromium() {
    let mut c = LocalCluster::new(&["u1", "u2", "u3"]);
    c.form(READY);
    let dir = c.dir.path();
    let g = dir.join("k.qcsr").display().to_string();
    quiver(dir, &["graph", "generate", "kronecker", "--scale", "10", "--seed", "5", "--out", &g]).ok();
    let job = c.cli(0, &["submit", &g, "--algo", "pagerank", "--iterations", "20", "--partitions", "3", "--wait"]);
    let job = job.json();
    assert_eq!(job["state"], "succeeded", "{job}");
    let id = job["id"].as_u64().unwrap();

    // The JSON the page polls: every node answers with the whole cluster.
    for a in &c.agents {
        let (code, body) = a.http_get("/ui/api/state").unwrap();
        assert_eq!(code, 200, "{body}");
        let s: Value = serde_json::from_str(&body).unwrap();
        let names: Vec<&str> = s["members"].as_array().unwrap().iter().filter_map(|m| m["name"].as_str()).collect();
        assert_eq!(names.len(), 3, "{s}");
        assert!(["u1", "u2", "u3"].iter().all(|n| names.contains(n)), "{s}");
        assert!(s["leader"]["name"].is_string(), "{s}");
        let j = s["jobs"].as_array().unwrap().iter().find(|j| j["id"] == id).expect("the job is listed");
        assert_eq!((j["state"].as_str(), j["superstep"].as_u64()), (Some("succeeded"), Some(20)), "{j}");
        let placed: Vec<&str> =
            j["placement"].as_array().unwrap().iter().filter_map(|p| p["node_name"].as_str()).collect();
        assert_eq!(placed.len(), 3, "every partition is placed: {j}");
        assert!(!body.contains("secret"), "no token material in the view");
    }
    let (code, html) = c.agents[1].http_get("/ui").unwrap();
    assert_eq!(code, 200);
    assert!(html.contains("<svg") || html.contains("placement"), "the page is served");
    assert!(!html.contains("https://") && !html.contains("src=\"http"), "no CDN: the page is self-contained");

    let Some(bin) = chromium() else {
        eprintln!(
            "SKIPPED (browser half): no chromium found (apt-get install chromium, or set QUIVER_CHROMIUM); \
             the /ui JSON checks above ran"
        );
        return;
    };
    let url = format!("http://127.0.0.1:{}/ui", c.agents[1].http_port);
    let profile = dir.join("chromium-profile");
    let dom = browse(&bin, &profile, &["--dump-dom".into()], &url);
    for name in ["u1", "u2", "u3"] {
        assert!(dom.contains(&format!("data-member=\"{name}\"")), "member {name} missing from the DOM:\n{dom}");
    }
    assert!(dom.contains(&format!("data-job=\"{id}\"")), "job {id} missing from the DOM:\n{dom}");
    assert!(dom.contains("succeeded") && dom.contains("100%"), "the job's progress is shown:\n{dom}");
    assert!(dom.contains("id=\"placement-svg\"") && dom.contains("data-partition=\"2\""), "placement drawn:\n{dom}");
    assert!(dom.contains("leader"), "{dom}");

    let artefacts = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/artefacts");
    std::fs::create_dir_all(&artefacts).unwrap();
    let png = artefacts.join("ui.png");
    let _ = std::fs::remove_file(&png);
    browse(&bin, &profile, &[format!("--screenshot={}", png.display())], &url);
    let bytes = std::fs::read(&png).unwrap_or_else(|e| panic!("no screenshot at {}: {e}", png.display()));
    assert!(bytes.starts_with(b"\x89PNG") && bytes.len() > 10_000, "a real screenshot ({} bytes)", bytes.len());
    eprintln!("screenshot: {}", png.canonicalize().unwrap_or(png).display());
}
