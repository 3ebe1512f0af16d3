//! Real `quiver agent` processes on loopback for the integration tests: a cluster CA and
//! certificates in a temporary directory, free ports, start / SIGKILL / SIGTERM / restart from
//! the same data directory, and waits that poll with a deadline (never a fixed sleep).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::bin::{Run, quiver_bin};

/// The one wait of the tests and drills: polls `f` every 20 ms until it returns `Ok`, or after
/// `within` returns an error naming `what` and the last thing `f` saw.
pub fn poll<T>(what: &str, within: Duration, mut f: impl FnMut() -> Result<T, String>) -> Result<T, String> {
    let deadline = Instant::now() + within;
    loop {
        match f() {
            Ok(v) => return Ok(v),
            Err(last) if Instant::now() >= deadline => {
                return Err(format!("timed out after {within:?} waiting for {what}: {last}"));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// [`poll`] that panics on timeout.
#[track_caller]
pub fn wait_for<T>(what: &str, within: Duration, f: impl FnMut() -> Result<T, String>) -> T {
    poll(what, within, f).unwrap_or_else(|e| panic!("{e}"))
}

/// A port free for both UDP and TCP on 127.0.0.1 right now, and not handed out before by this
/// process (the probe sockets close at once, so the OS may offer the same port again).
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    loop {
        let tcp = TcpListener::bind("127.0.0.1:0").expect("binding a probe port");
        let port = tcp.local_addr().expect("probe address").port();
        if UdpSocket::bind(("127.0.0.1", port)).is_ok() {
            let mut given = GIVEN.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if !given.contains(&port) {
                given.push(port);
                return port;
            }
        }
    }
}

/// One agent: its name, directories and ports, and its process while it runs.
pub struct Agent {
    pub name: String,
    pub data_dir: PathBuf,
    pub tls_dir: PathBuf,
    pub peer_port: u16,
    pub grpc_port: u16,
    pub http_port: u16,
    pub log: PathBuf,
    bin: PathBuf,
    child: Option<Child>,
}

impl Agent {
    /// The gRPC address for `--addr`.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.grpc_port)
    }

    /// The peer address for `--join`.
    pub fn peer_addr(&self) -> String {
        format!("127.0.0.1:{}", self.peer_port)
    }

    /// Starts the agent with `extra` flags (`--bootstrap`, `--join …`, or none to restart).
    pub fn start(&mut self, extra: &[&str]) {
        assert!(self.child.is_none(), "{} is already running", self.name);
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log).expect("opening the agent log");
        let mut cmd = Command::new(&self.bin);
        cmd.arg("agent")
            .args(["--node-name", &self.name])
            .arg("--data-dir")
            .arg(&self.data_dir)
            .arg("--tls-dir")
            .arg(&self.tls_dir)
            .args(["--peer-addr", &self.peer_addr()])
            .args(["--grpc-addr", &self.addr()])
            .args(["--http-addr", &format!("127.0.0.1:{}", self.http_port)])
            .args(["--config", "/dev/null"])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        self.child = Some(cmd.spawn().expect("spawning quiver agent"));
    }

    /// The process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Sends SIGHUP (reload the certificates).
    pub fn sighup(&self) {
        let pid = self.pid().unwrap_or_else(|| panic!("{} is not running", self.name));
        let status = Command::new("kill").args(["-HUP", &pid.to_string()]).status().expect("running kill");
        assert!(status.success(), "kill -HUP {pid} failed");
    }

    /// Waits (bounded) for the process to exit by itself; its exit status.
    #[track_caller]
    pub fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let name = self.name.clone();
        let c = self.child.as_mut().unwrap_or_else(|| panic!("{name} is not running"));
        let exited = poll(&format!("{name} to exit"), within, || {
            c.try_wait().expect("waiting for the agent").ok_or_else(|| "still running".to_string())
        });
        match exited {
            Ok(s) => {
                self.child = None;
                s
            }
            Err(e) => panic!("{e}\n{}", self.log_tail()),
        }
    }

    /// Whether the process is running.
    pub fn is_running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }

    /// SIGKILL, and reap.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, and wait (bounded) for the exit status.
    pub fn sigterm(&mut self, within: Duration) -> ExitStatus {
        let mut c = self.child.take().expect("agent not running");
        let status = Command::new("kill").args(["-TERM", &c.id().to_string()]).status().expect("running kill");
        assert!(status.success(), "kill -TERM failed");
        let exited = poll(&format!("{} to exit after SIGTERM", self.name), within, || {
            c.try_wait().expect("waiting for the agent").ok_or_else(|| "still running".to_string())
        });
        exited.unwrap_or_else(|e| {
            let _ = c.kill();
            let _ = c.wait();
            panic!("{e}\n{}", self.log_tail())
        })
    }

    /// SIGSTOP: the process stalls (every thread, sockets left open) until [`Self::cont`].
    pub fn stop(&self) {
        self.signal("STOP");
    }

    /// SIGCONT after [`Self::stop`].
    pub fn cont(&self) {
        self.signal("CONT");
    }

    fn signal(&self, name: &str) {
        let pid = self.pid().unwrap_or_else(|| panic!("{} is not running", self.name));
        let status = Command::new("kill").args([&format!("-{name}"), &pid.to_string()]).status().expect("running kill");
        assert!(status.success(), "kill -{name} {pid} failed");
    }

    /// An HTTP GET on the agent's HTTP port: (status code, body).
    pub fn http_get(&self, path: &str) -> Result<(u16, String), String> {
        self.http("GET", path, "")
    }

    /// An HTTP request with `body` on the agent's HTTP port (`POST /chaos/net`, `PUT
    /// /chaos/failpoints/NAME`): (status code, body).
    pub fn http(&self, method: &str, path: &str, body: &str) -> Result<(u16, String), String> {
        let mut s = TcpStream::connect(("127.0.0.1", self.http_port)).map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(Duration::from_secs(2))).map_err(|e| e.to_string())?;
        write!(s, "{method} {path} HTTP/1.0\r\nHost: 127.0.0.1\r\nContent-Length: {}\r\n\r\n{body}", body.len())
            .map_err(|e| e.to_string())?;
        let mut text = String::new();
        s.read_to_string(&mut text).map_err(|e| e.to_string())?;
        let code = text.split_whitespace().nth(1).and_then(|c| c.parse().ok()).ok_or("no status line")?;
        let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
        Ok((code, body))
    }

    /// Waits until `/readyz` answers 200.
    #[track_caller]
    pub fn wait_ready(&mut self, within: Duration) {
        // Ok(false): the process exited, which no amount of waiting mends.
        let ready = poll(&format!("{} to be ready", self.name), within, || match self.http_get("/readyz") {
            Ok((200, _)) => Ok(true),
            _ if !self.is_running() => Ok(false),
            other => Err(format!("{other:?}")),
        });
        match ready {
            Ok(true) => {}
            Ok(false) => panic!("{} exited while waiting for it to be ready\n{}", self.name, self.log_tail()),
            Err(e) => panic!("{e}\n{}", self.log_tail()),
        }
    }

    /// The last lines of the agent's log, for failure messages.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        format!("--- {} log (tail) ---\n{}", self.name, lines[lines.len().saturating_sub(30)..].join("\n"))
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A CA, a client certificate and agents in one temporary directory.
pub struct LocalCluster {
    pub dir: tempfile::TempDir,
    bin: PathBuf,
    pub client_tls: PathBuf,
    pub agents: Vec<Agent>,
}

impl LocalCluster {
    /// Makes the CA, a client certificate and `names.len()` agents (not started), running the
    /// `quiver` binary of this build.
    pub fn new(names: &[&str]) -> Self {
        Self::with_bin(names, quiver_bin().to_path_buf())
    }

    /// Like [`Self::new`] with the `quiver` binary at `bin` (`quiver bench` passes itself).
    pub fn with_bin(names: &[&str], bin: PathBuf) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let quiver = |dir: &Path, args: &[&str]| run_bin(&bin, dir, args);
        let root = dir.path();
        let ca = root.join("ca");
        quiver(root, &["tls", "ca", "create", "--out", path(&ca)]).ok();
        let client_tls = root.join("client");
        quiver(
            root,
            &["tls", "cert", "create", "--ca", path(&ca), "--name", "tester", "--out", path(&client_tls), "--client"],
        )
        .ok();
        let agents = names
            .iter()
            .map(|name| {
                let data_dir = root.join(name);
                let tls_dir = data_dir.join("tls");
                quiver(root, &["tls", "cert", "create", "--ca", path(&ca), "--name", name, "--out", path(&tls_dir)])
                    .ok();
                Agent {
                    name: name.to_string(),
                    log: root.join(format!("{name}.log")),
                    data_dir,
                    tls_dir,
                    peer_port: free_port(),
                    grpc_port: free_port(),
                    http_port: free_port(),
                    bin: bin.clone(),
                    child: None,
                }
            })
            .collect();
        LocalCluster { dir, bin, client_tls, agents }
    }

    /// The cluster CA's directory (`ca.pem`, `ca.key`).
    pub fn ca_dir(&self) -> PathBuf {
        self.dir.path().join("ca")
    }

    /// Adds an agent (not started) whose TLS directory is empty: it joins with a token, or a
    /// test puts other certificates there. Returns its index.
    pub fn add_agent_without_cert(&mut self, name: &str) -> usize {
        let data_dir = self.dir.path().join(name);
        self.agents.push(Agent {
            name: name.to_string(),
            log: self.dir.path().join(format!("{name}.log")),
            tls_dir: data_dir.join("tls"),
            data_dir,
            peer_port: free_port(),
            grpc_port: free_port(),
            http_port: free_port(),
            bin: self.bin.clone(),
            child: None,
        });
        self.agents.len() - 1
    }

    /// Forms the cluster: agent 0 bootstraps, every other agent joins through its peer address,
    /// then waits until agent 0 lists all of them alive.
    pub fn form(&mut self, within: Duration) {
        self.agents[0].start(&["--bootstrap"]);
        self.agents[0].wait_ready(within);
        let seed = self.agents[0].peer_addr();
        for agent in &mut self.agents[1..] {
            agent.start(&["--join", &seed]);
        }
        for agent in &mut self.agents[1..] {
            agent.wait_ready(within);
        }
        let n = self.agents.len();
        wait_for(&format!("{n} alive members"), within, || {
            let v = self.cli(0, &["members"]).json();
            let alive = v.as_array().into_iter().flatten().filter(|m| m["state"] == "alive").count();
            if alive == n { Ok(()) } else { Err(v.to_string()) }
        });
    }

    /// Runs a client command against agent `i` (`--addr`, `--tls-dir` and `--output json` added).
    pub fn cli(&self, i: usize, args: &[&str]) -> Run {
        let mut all: Vec<&str> = args.to_vec();
        let addr = self.agents[i].addr();
        all.extend(["--addr", &addr, "--tls-dir", path(&self.client_tls), "--output", "json"]);
        run_bin(&self.bin, self.dir.path(), &all)
    }

    /// Copies every agent's whole log to `dir` as `PREFIX-NAME.log` (best effort: the logs are
    /// a diagnostic, never a reason to fail).
    pub fn keep_logs(&self, dir: &Path, prefix: &str) {
        let _ = std::fs::create_dir_all(dir);
        for a in &self.agents {
            let _ = std::fs::copy(&a.log, dir.join(format!("{prefix}-{}.log", a.name)));
        }
    }

    /// Every agent's log tail.
    pub fn logs(&self) -> String {
        self.agents.iter().map(Agent::log_tail).collect::<Vec<_>>().join("\n")
    }
}

/// Runs `bin ARGS…` in `dir` and waits for it.
fn run_bin(bin: &Path, dir: &Path, args: &[&str]) -> Run {
    let out = Command::new(bin).args(args).current_dir(dir).output().expect("spawning quiver");
    Run {
        status: out.status,
        stdout: String::from_utf8_lossy(&out.stdout).into(),
        stderr: String::from_utf8_lossy(&out.stderr).into(),
    }
}

fn path(p: &Path) -> &str {
    p.to_str().expect("utf-8 temp path")
}
