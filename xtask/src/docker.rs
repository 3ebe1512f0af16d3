//! `cargo xtask docker`: builds the `quiver:local` image with no registry, and
//! `cargo xtask compose-test`: the Compose cluster test (deploy/compose.yaml) with Docker drills.
//!
//! The image: the host builds the release binary; xtask assembles a root filesystem next to it
//! (the stripped binary, the shared objects `ldd` lists, /etc/passwd and /etc/group with the
//! non-root user 65532, an empty /tmp) and `docker build`s deploy/docker/Dockerfile.local on it,
//! which starts FROM scratch, so nothing is pulled. The layout matches deploy/docker/Dockerfile,
//! the multi-stage build for machines with a registry (xtask's tidy tests compare them).
//!
//! The Compose test speaks to the cluster only as a user would: the host's `quiver` CLI over the
//! published gRPC ports, HTTP on the published health ports, and Docker itself for the faults
//! (`docker kill`, `docker network disconnect`/`connect`). Every wait has a deadline; the stack
//! is torn down (`down -v`) before and after, whatever happens.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::Value;

/// The tag `cargo xtask docker` gives the image (deploy/compose.yaml's default image).
pub const LOCAL_TAG: &str = "quiver:local";
/// The Compose projects the test uses are this prefix and the run's process id, so two runs on
/// one engine (two checkouts, another project's CI) never share containers, networks or volumes.
/// The name of the current run's project is kept in the target dir, so a stack left over by an
/// interrupted run of this checkout is found and removed (`down -v`) before the next run.
const PROJECT_PREFIX: &str = "quiver-deploy-test";
/// The non-root user of both images (distroless's `nonroot`).
const UID: u32 = 65532;

/// Whether a Docker engine answers (`docker info`).
pub fn engine_available() -> bool {
    run(Command::new("docker").arg("info"), Duration::from_secs(20)).is_ok_and(|o| o.ok)
}

/// Whether the task's arguments ask to reuse the release binary as it is (`--no-build`).
pub fn cargo_build_wanted(args: &[String]) -> bool {
    !args.iter().any(|a| a == "--no-build")
}

/// `cargo xtask docker [--no-build]`: builds the release binary (unless told not to) and the
/// `quiver:local` image; returns and prints its size.
pub fn build_image(root: &Path, cargo_build: bool) -> Result<u64> {
    let started = Instant::now();
    if cargo_build {
        crate::cargo(&["build", "--release", "-p", "quiver"])?;
    }
    let bin = target_dir(root).join("release").join("quiver");
    let ctx = target_dir(root).join("docker-context");
    if ctx.exists() {
        std::fs::remove_dir_all(&ctx).with_context(|| format!("removing {}", ctx.display()))?;
    }
    let rootfs = ctx.join("rootfs");
    std::fs::create_dir_all(rootfs.join("usr/local/bin"))?;
    let image_bin = rootfs.join("usr/local/bin/quiver");
    // The release profile keeps line tables for profiling; the image does not need them.
    let strip = run(Command::new("strip").arg("--strip-all").arg(&bin).arg("-o").arg(&image_bin), mins(2))?;
    if !strip.ok {
        eprintln!("strip failed ({}); copying the unstripped binary", strip.stderr.trim());
        std::fs::copy(&bin, &image_bin)?;
    }
    for lib in shared_objects(&bin)? {
        let dest = rootfs.join(lib.strip_prefix("/").unwrap_or(&lib));
        std::fs::create_dir_all(dest.parent().expect("a library path has a parent"))?;
        // `fs::copy` follows symbolic links: the soname path gets the real file's bytes.
        std::fs::copy(&lib, &dest).with_context(|| format!("copying {}", lib.display()))?;
    }
    let etc = rootfs.join("etc");
    std::fs::create_dir_all(&etc)?;
    std::fs::write(
        etc.join("passwd"),
        format!("root:x:0:0:root:/root:/sbin/nologin\nquiver:x:{UID}:{UID}:quiver:/var/lib/quiver:/sbin/nologin\n"),
    )?;
    std::fs::write(etc.join("group"), format!("root:x:0:\nquiver:x:{UID}:\n"))?;
    // glibc resolves names (`--join agent1:7400`) through /etc/hosts, then Docker's DNS.
    std::fs::write(etc.join("nsswitch.conf"), "hosts: files dns\n")?;
    let tmp = rootfs.join("tmp");
    std::fs::create_dir_all(&tmp)?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o1777))?;
    for dir in ["state/var/lib/quiver", "state/etc/quiver/tls"] {
        std::fs::create_dir_all(ctx.join(dir))?;
    }
    std::fs::copy(root.join("deploy/docker/Dockerfile.local"), ctx.join("Dockerfile"))?;

    let mut build = Command::new("docker");
    build.args(["build", "--quiet", "-t", LOCAL_TAG]).arg(&ctx);
    // Without the buildx plugin the client needs the classic builder; FROM scratch works in both.
    if !run(Command::new("docker").args(["buildx", "version"]), Duration::from_secs(20)).is_ok_and(|o| o.ok) {
        build.env("DOCKER_BUILDKIT", "0");
    }
    let out = run(&mut build, mins(5))?;
    if !out.ok {
        bail!("docker build failed: {}{}", out.stdout, out.stderr);
    }
    let size: u64 = docker(&["image", "inspect", "-f", "{{.Size}}", LOCAL_TAG])?
        .trim()
        .parse()
        .context("parsing the image size")?;
    eprintln!("built {LOCAL_TAG}: {:.1} MB ({size} bytes) in {:.0?}", size as f64 / 1e6, started.elapsed());
    Ok(size)
}

/// The absolute paths of the shared objects the binary loads, from `ldd`.
fn shared_objects(bin: &Path) -> Result<Vec<PathBuf>> {
    let out = run(Command::new("ldd").arg(bin), Duration::from_secs(30))?;
    if !out.ok {
        bail!("ldd {} failed: {}", bin.display(), out.stderr);
    }
    // Lines look like `libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x…)`,
    // `/lib64/ld-linux-x86-64.so.2 (0x…)` or `linux-vdso.so.1 (0x…)` (no file).
    let libs: Vec<PathBuf> = out
        .stdout
        .lines()
        .filter_map(|l| {
            let path = l.split("=>").last()?.split_whitespace().next()?;
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect();
    if !libs.iter().any(|l| l.to_string_lossy().contains("libc.so")) {
        bail!(
            "ldd found no libc for {} (a static binary needs no libraries; this one is unexpected):\n{}",
            bin.display(),
            out.stdout
        );
    }
    Ok(libs)
}

/// `cargo xtask ci`'s deploy stage: the Compose test when an engine answers, else a clear skip.
pub fn ci(root: &Path) -> Result<()> {
    if !engine_available() {
        eprintln!("deploy: SKIPPED the Compose cluster test: no Docker engine (`docker info` failed)");
        return Ok(());
    }
    compose_test(root, true)
}

/// `cargo xtask compose-test [--no-build]`.
pub fn compose_test(root: &Path, cargo_build: bool) -> Result<()> {
    let started = Instant::now();
    let mut compose = Compose::find(root)?;
    build_image(root, cargo_build)?;
    let bin = target_dir(root).join("release").join("quiver");
    let work = target_dir(root).join("compose-test");
    if work.exists() {
        std::fs::remove_dir_all(&work)?;
    }
    std::fs::create_dir_all(&work)?;
    let marker = target_dir(root).join("compose-test.project");
    if let Ok(leftover) = std::fs::read_to_string(&marker) {
        compose.with_project(leftover.trim()).down();
    }
    std::fs::write(&marker, &compose.project)?;
    let result = compose.up().and_then(|()| {
        ComposeTest { compose: &compose, bin: &bin, work: &work, client_tls: work.join("client") }.run()
    });
    if result.is_err() {
        eprintln!("--- container logs (tail) ---");
        let _ = compose
            .run(&["logs", "--no-color", "--tail", "40"], mins(1))
            .map(|o| eprintln!("{}{}", o.stdout, o.stderr));
    }
    compose.down();
    let _ = std::fs::remove_file(&marker);
    result?;
    eprintln!("deploy: Compose cluster test passed in {:.1?} (image build included)", started.elapsed());
    Ok(())
}

/// The Compose command of this machine (`docker compose` or `docker-compose`) on the project.
struct Compose {
    program: Vec<String>,
    file: PathBuf,
    project: String,
    /// Variables compose.yaml interpolates (subnet, published ports), set by the test.
    env: Vec<(String, String)>,
}

impl Compose {
    fn find(root: &Path) -> Result<Self> {
        let file = root.join("deploy/compose.yaml");
        for program in [vec!["docker", "compose"], vec!["docker-compose"]] {
            let mut cmd = Command::new(program[0]);
            cmd.args(&program[1..]).arg("version");
            if run(&mut cmd, Duration::from_secs(30)).is_ok_and(|o| o.ok) {
                return Ok(Compose {
                    program: program.into_iter().map(String::from).collect(),
                    file,
                    project: format!("{PROJECT_PREFIX}-{}", std::process::id()),
                    env: Vec::new(),
                });
            }
        }
        bail!("neither `docker compose` nor `docker-compose` works on this machine")
    }

    /// The same Compose command on another project (a leftover stack to remove).
    fn with_project(&self, project: &str) -> Compose {
        Compose {
            program: self.program.clone(),
            file: self.file.clone(),
            project: project.to_string(),
            env: self.env.clone(),
        }
    }

    fn run(&self, args: &[&str], within: Duration) -> Result<Out> {
        let mut cmd = Command::new(&self.program[0]);
        cmd.args(&self.program[1..]).args(["-p", &self.project, "-f"]).arg(&self.file).args(args);
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        run(&mut cmd, within)
    }

    /// `up -d` on a free /24 for the cluster's network and, when 7401/7402 are taken on this
    /// host, on free loopback ports. Docker refuses a subnet that overlaps another network's
    /// ("Pool overlaps"), which another stack may take between the look and the `up`: then the
    /// next free subnet is tried.
    fn up(&mut self) -> Result<()> {
        let t = Instant::now();
        for (var, default) in [("QUIVER_GRPC_PORT", 7401), ("QUIVER_HTTP_PORT", 7402)] {
            let port = if std::net::TcpListener::bind(("127.0.0.1", default)).is_ok() {
                default
            } else {
                let free = std::net::TcpListener::bind(("127.0.0.1", 0))?.local_addr()?.port();
                eprintln!("compose: 127.0.0.1:{default} is taken on this host; publishing on {free} instead");
                free
            };
            self.env.push((var.into(), port.to_string()));
        }
        let mut last = String::new();
        for _ in 0..4 {
            let prefix = free_subnet_prefix()?;
            self.env.retain(|(k, _)| k != "QUIVER_SUBNET_PREFIX");
            self.env.push(("QUIVER_SUBNET_PREFIX".into(), prefix.clone()));
            let out = self.run(&["up", "-d"], mins(3))?;
            if out.ok {
                eprintln!("compose up ({}, network {prefix}.0/24): {:.1?}", self.project, t.elapsed());
                return Ok(());
            }
            last = format!("{}{}", out.stdout, out.stderr);
            if !last.contains("overlap") {
                break;
            }
            eprintln!("compose: {prefix}.0/24 was taken meanwhile; trying another");
            self.down();
        }
        bail!("compose up -d failed: {last}")
    }

    /// Removes the project's containers, networks and volumes (also a leftover stack).
    fn down(&self) {
        match self.run(&["down", "-v", "--remove-orphans", "--timeout", "5"], mins(2)) {
            Ok(o) if o.ok => {}
            Ok(o) => eprintln!("compose down: {}", o.stderr.trim()),
            Err(e) => eprintln!("compose down: {e:#}"),
        }
    }

    /// The container id of a service (running or exited), from Compose's labels.
    fn container(&self, service: &str) -> Result<String> {
        let id = docker(&[
            "ps",
            "-aq",
            "--filter",
            &format!("label=com.docker.compose.project={}", self.project),
            "--filter",
            &format!("label=com.docker.compose.service={service}"),
        ])?;
        id.lines().next().map(str::to_string).with_context(|| format!("no container for service {service}"))
    }
}

struct ComposeTest<'a> {
    compose: &'a Compose,
    bin: &'a Path,
    work: &'a Path,
    client_tls: PathBuf,
}

const AGENTS: [&str; 3] = ["agent1", "agent2", "agent3"];

impl ComposeTest<'_> {
    fn run(&self) -> Result<()> {
        // The operator's client certificate, made inside the stack by the tls-client service.
        let client = self.compose.container("tls-client")?;
        docker(&["cp", &format!("{client}:/etc/quiver/tls/client"), path(self.work)?])?;

        let t = Instant::now();
        self.wait_alive("agent1", 3, secs(60))?;
        eprintln!("cluster formed (3 alive members): {:.1?}", t.elapsed());
        // The image's health check (`quiver health`, every 2 s in compose.yaml) reports healthy.
        for agent in AGENTS {
            let id = self.compose.container(agent)?;
            wait(&format!("{agent}'s container healthy"), secs(30), || {
                let s = docker(&["inspect", "-f", "{{.State.Health.Status}}", &id])?;
                if s.trim() == "healthy" { Ok(()) } else { bail!("{}", s.trim()) }
            })?;
        }

        let graph = self.work.join("k.qcsr");
        let g = path(&graph)?;
        self.quiver(&["graph", "generate", "kronecker", "--scale", "10", "--seed", "5", "--out", g])?;
        let algo = ["--algo", "pagerank", "--iterations", "20"];
        let mut args = vec!["run", "--graph", g, "--json"];
        args.extend(algo);
        let reference = json(&self.quiver(&args)?)?["result_digest"].as_str().context("run: no digest")?.to_string();
        self.submit("agent1", g, &algo, &reference)?;

        // Drill 1: SIGKILL the leader's container; a survivor elects a leader and takes a job.
        let leader = self.leader("agent1")?;
        let leader_id = self.compose.container(&leader)?;
        let survivor = AGENTS.iter().copied().find(|a| *a != leader).expect("two survivors");
        let t = Instant::now();
        docker(&["kill", &leader_id])?;
        let new_leader = wait("a new leader among the survivors", secs(30), || {
            let l = self.leader(survivor)?;
            if l == leader { bail!("still {l}") } else { Ok(l) }
        })?;
        eprintln!("drill kill: {leader} killed, {new_leader} leads after {:.1?}", t.elapsed());
        self.submit(survivor, g, &algo, &reference)?;
        docker(&["start", &leader_id])?;
        self.wait_alive(survivor, 3, secs(60))?;
        eprintln!("drill kill: {leader} restarted from its volume; 3 alive after {:.1?}", t.elapsed());

        // Drill 2: cut one node off the network, see it marked down, reconnect, converge again.
        let cut = "agent3";
        let cut_id = self.compose.container(cut)?;
        let inspect = json(&docker(&["inspect", &cut_id])?)?;
        let networks = &inspect[0]["NetworkSettings"]["Networks"];
        let (network, ip) = networks
            .as_object()
            .and_then(|m| m.iter().next())
            .map(|(name, n)| (name.clone(), n["IPAddress"].as_str().unwrap_or_default().to_string()))
            .context("agent3 is on no network")?;
        let t = Instant::now();
        docker(&["network", "disconnect", &network, &cut_id])?;
        wait("agent3 seen as not alive", secs(30), || {
            let state = self.member_states("agent1")?;
            match state.iter().find(|(n, _)| n == cut) {
                Some((_, s)) if s != "alive" => Ok(()),
                other => bail!("{other:?}"),
            }
        })?;
        eprintln!("drill partition: {cut} disconnected, marked down after {:.1?}", t.elapsed());
        docker(&["network", "connect", "--ip", &ip, "--alias", cut, &network, &cut_id])?;
        let t = Instant::now();
        self.wait_alive("agent1", 3, secs(60))?;
        wait("agent3 ready again", secs(30), || {
            let port = self.host_port(cut, 7402)?;
            match http_get(&port, "/readyz") {
                Ok((200, _)) => Ok(()),
                other => bail!("{other:?}"),
            }
        })?;
        eprintln!("drill partition: {cut} reconnected; 3 alive after {:.1?}", t.elapsed());
        self.submit(cut, g, &algo, &reference)?;

        self.startup_time()?;
        Ok(())
    }

    /// Runs the host's `quiver` binary; its stdout on success.
    fn quiver(&self, args: &[&str]) -> Result<String> {
        let out = run(Command::new(self.bin).args(args).current_dir(self.work), mins(2))?;
        if !out.ok {
            bail!("quiver {} failed: {}", args.join(" "), out.stderr.trim());
        }
        Ok(out.stdout)
    }

    /// A client command against `agent`'s published gRPC port, with --output json.
    fn cli(&self, agent: &str, args: &[&str]) -> Result<Value> {
        let addr = self.host_port(agent, 7401)?;
        let mut all = args.to_vec();
        all.extend(["--addr", &addr, "--tls-dir", path(&self.client_tls)?, "--output", "json"]);
        json(&self.quiver(&all)?)
    }

    /// `127.0.0.1:PORT` where the host reaches `agent`'s container port.
    fn host_port(&self, agent: &str, port: u16) -> Result<String> {
        let id = self.compose.container(agent)?;
        let out = docker(&["port", &id, &format!("{port}/tcp")])?;
        let addr = out.lines().find(|l| l.starts_with("127.0.0.1:")).context("port not published on 127.0.0.1")?;
        Ok(addr.trim().to_string())
    }

    fn leader(&self, via: &str) -> Result<String> {
        let v = self.cli(via, &["status"])?;
        v["leader"].as_str().map(str::to_string).with_context(|| format!("no leader: {v}"))
    }

    fn member_states(&self, via: &str) -> Result<Vec<(String, String)>> {
        let v = self.cli(via, &["members"])?;
        let rows = v.as_array().with_context(|| format!("members: {v}"))?;
        Ok(rows
            .iter()
            .map(|m| (m["name"].as_str().unwrap_or("").to_string(), m["state"].as_str().unwrap_or("").to_string()))
            .collect())
    }

    fn wait_alive(&self, via: &str, n: usize, within: Duration) -> Result<()> {
        wait(&format!("{n} alive members seen from {via}"), within, || {
            let states = self.member_states(via)?;
            let alive = states.iter().filter(|(_, s)| s == "alive").count();
            if alive == n { Ok(()) } else { bail!("{states:?}") }
        })
    }

    /// Submits the graph through `agent` with --wait; the result must equal `quiver run`'s.
    fn submit(&self, agent: &str, graph: &str, algo: &[&str], reference: &str) -> Result<()> {
        let t = Instant::now();
        let mut args = vec!["submit", graph];
        args.extend(algo);
        args.push("--wait");
        let v = self.cli(agent, &args)?;
        if v["state"] != "succeeded" || v["result_digest"] != reference {
            bail!("job through {agent}: {v}; want state succeeded and result digest {reference}");
        }
        eprintln!("job {} through {agent}: succeeded, digest equals quiver run's, {:.1?}", v["id"], t.elapsed());
        Ok(())
    }

    /// Container start → /readyz 200 for one agent that bootstraps alone (a throwaway
    /// single-node cluster on the test's network, with agent1's certificate and a fresh volume).
    fn startup_time(&self) -> Result<()> {
        let agent1 = self.compose.container("agent1")?;
        let inspect = json(&docker(&["inspect", &agent1])?)?;
        let (network, ip) = inspect[0]["NetworkSettings"]["Networks"]
            .as_object()
            .and_then(|m| m.iter().next())
            .map(|(name, n)| (name.clone(), n["IPAddress"].as_str().unwrap_or_default().to_string()))
            .context("agent1 is on no network")?;
        let prefix = ip.rsplit_once('.').context("an IPv4 address")?.0;
        let solo_ip = format!("{prefix}.20");
        let project = &self.compose.project;
        let tls_volume = format!("{project}_tls");
        let name = format!("{project}-startup");
        let _ = docker(&["rm", "-f", &name]);
        docker(&[
            "create",
            "--name",
            &name,
            "--label",
            &format!("com.docker.compose.project={project}"),
            "--network",
            &network,
            "--ip",
            &solo_ip,
            "-p",
            "127.0.0.1::7402",
            "-v",
            &format!("{tls_volume}:/etc/quiver/tls:ro"),
            LOCAL_TAG,
            "agent",
            "--bootstrap",
            "--node-name",
            "agent1",
            "--tls-dir",
            "/etc/quiver/tls/agent1",
            "--peer-addr",
            "0.0.0.0:7400",
            "--advertise-addr",
            &format!("{solo_ip}:7400"),
        ])?;
        let result = time_to_ready(&name);
        let _ = docker(&["rm", "-f", "-v", &name]);
        result
    }
}

/// The first `172.29.N` (then `10.213.N`) whose /24 overlaps no Docker network and no route or
/// address of this host.
fn free_subnet_prefix() -> Result<String> {
    let mut used: Vec<(u32, u32)> = Vec::new();
    let ids = docker(&["network", "ls", "-q"])?;
    let ids: Vec<&str> = ids.split_whitespace().collect();
    if !ids.is_empty() {
        let mut args = vec!["network", "inspect", "-f", "{{range .IPAM.Config}}{{.Subnet}} {{end}}"];
        args.extend(&ids);
        used.extend(docker(&args)?.split_whitespace().filter_map(parse_cidr));
    }
    for ip_args in [["-4", "-o", "route"], ["-4", "-o", "addr"]] {
        if let Ok(out) = run(Command::new("ip").args(ip_args), secs(10)) {
            used.extend(out.stdout.split_whitespace().filter_map(parse_cidr));
        }
    }
    let candidates = (74..=254).map(|n| format!("172.29.{n}")).chain((0..=255).map(|n| format!("10.213.{n}")));
    for prefix in candidates {
        let (net, mask) = parse_cidr(&format!("{prefix}.0/24")).expect("a valid /24");
        if !used.iter().any(|&other| overlaps((net, mask), other)) {
            return Ok(prefix);
        }
    }
    bail!("no free /24 under 172.29.0.0/16 or 10.213.0.0/16 for the test's network")
}

/// Whether two (network, mask) ranges share an address: they agree on the shorter prefix.
fn overlaps((a, am): (u32, u32), (b, bm): (u32, u32)) -> bool {
    let common = am & bm;
    a & common == b & common
}

/// `a.b.c.d/len` as (network, mask); anything else (IPv6, words) is None. `default` routes are
/// not CIDRs and so are skipped: they overlap everything and say nothing about local networks.
fn parse_cidr(text: &str) -> Option<(u32, u32)> {
    let (addr, len) = text.split_once('/')?;
    let addr: std::net::Ipv4Addr = addr.parse().ok()?;
    let len: u32 = len.parse().ok().filter(|l| *l <= 32)?;
    let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
    Some((u32::from(addr) & mask, mask))
}

/// `docker start NAME` → its published HTTP port answers /readyz 200; prints the time.
fn time_to_ready(name: &str) -> Result<()> {
    let t = Instant::now();
    docker(&["start", name])?;
    let port = docker(&["port", name, "7402/tcp"])?;
    let port = port.lines().next().context("no published port")?.trim().to_string();
    wait("the single agent's /readyz", secs(30), || match http_get(&port, "/readyz") {
        Ok((200, _)) => Ok(()),
        other => bail!("{other:?}"),
    })?;
    eprintln!("startup: container start → /readyz 200 in {:.0?}", t.elapsed());
    Ok(())
}

fn target_dir(root: &Path) -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| root.join("target"))
}

fn path(p: &Path) -> Result<&str> {
    p.to_str().with_context(|| format!("{} is not UTF-8", p.display()))
}

fn json(text: &str) -> Result<Value> {
    let last = text.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("");
    serde_json::from_str(text).or_else(|_| serde_json::from_str(last)).with_context(|| format!("not JSON: {text}"))
}

const fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

const fn mins(n: u64) -> Duration {
    Duration::from_secs(60 * n)
}

/// Polls `f` every 200 ms until it succeeds, or fails after `within` with its last error.
fn wait<T>(what: &str, within: Duration, mut f: impl FnMut() -> Result<T>) -> Result<T> {
    let deadline = Instant::now() + within;
    loop {
        match f() {
            Ok(v) => return Ok(v),
            Err(e) if Instant::now() >= deadline => bail!("timed out after {within:?} waiting for {what}: {e:#}"),
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

/// A finished command.
struct Out {
    ok: bool,
    stdout: String,
    stderr: String,
}

/// Runs a command to completion, killing it after `within`.
fn run(cmd: &mut Command, within: Duration) -> Result<Out> {
    let shown = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {shown}"))?;
    let (mut so, mut se) = (child.stdout.take().expect("piped"), child.stderr.take().expect("piped"));
    let out_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = so.read_to_string(&mut s);
        s
    });
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = se.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + within;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{shown} did not finish within {within:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let stdout = out_reader.join().unwrap_or_default();
    let stderr = err_reader.join().unwrap_or_default();
    Ok(Out { ok: status.success(), stdout, stderr })
}

/// `docker ARGS…`: stdout on success.
fn docker(args: &[&str]) -> Result<String> {
    let out = run(Command::new("docker").args(args), mins(2))?;
    if !out.ok {
        bail!("docker {} failed: {}", args.join(" "), out.stderr.trim());
    }
    Ok(out.stdout)
}

/// One HTTP/1.0 GET to `host:port`: (status code, body).
fn http_get(addr: &str, path: &str) -> Result<(u16, String)> {
    let addr = addr.parse().with_context(|| format!("{addr:?} is not an address"))?;
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let code = text.split_whitespace().nth(1).and_then(|c| c.parse().ok()).context("no HTTP status line")?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    Ok((code, body))
}

#[cfg(test)]
mod tests {
    use super::{overlaps, parse_cidr};

    #[test]
    fn subnets_overlap_when_they_share_the_shorter_prefix() {
        let c = |s| parse_cidr(s).unwrap();
        assert!(overlaps(c("172.29.74.0/24"), c("172.29.74.0/24")));
        assert!(overlaps(c("172.29.74.0/24"), c("172.16.0.0/12")), "inside a wider network");
        assert!(overlaps(c("172.29.74.0/24"), c("172.29.74.9/32")), "a host address inside");
        assert!(!overlaps(c("172.29.75.0/24"), c("172.29.74.0/24")));
        assert!(!overlaps(c("10.213.0.0/24"), c("172.17.0.0/16")));
        assert_eq!(parse_cidr("default"), None);
        assert_eq!(parse_cidr("fd00::/64"), None);
        assert_eq!(parse_cidr("10.0.0.1/33"), None);
    }
}
