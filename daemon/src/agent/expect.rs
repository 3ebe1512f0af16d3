//! `--bootstrap-expect N` (N > 1): agents started with no cluster on disk find each other through
//! their `--join` seeds and bootstrap exactly one cluster of all N (the lowest ids voters, up to
//! the voter target, as [`bootstrap_snapshot`](quiver_coordinator::bootstrap) builds it).
//!
//! 1. **Gossip.** Each waiting node sends `Hello { expect, known, locked }` (a `Control` request
//!    of kind `expect`) to its seeds and to every node it has heard of, and merges the answer,
//!    which is the same kind of `Hello`. A node is the only source of its own [`MemberInfo`]: the
//!    sender of a hello must be the node its certificate proves.
//! 2. **Lock.** The first time a node knows exactly N nodes (itself included) it locks that set:
//!    it writes it to `DATA_DIR/bootstrap-expect.lock` (fsync), then reports it in every hello and
//!    never takes in another node. Hearing of more than N nodes before locking is a configuration
//!    error that stops the agent with the names it saw.
//! 3. **Agree, then bootstrap.** A node bootstraps once every node of its locked set reports the
//!    very same locked set (member infos included). Each of the N then writes the identical
//!    bootstrap snapshot (a pure function of the member list) at index 1, term 1, so they start as
//!    one cluster, exactly as if one had bootstrapped and the others had installed its snapshot.
//!
//! Why this cannot produce two clusters: every member of a bootstrapped set S locked S, a lock is
//! permanent (it survives a crash on disk), and a node locks one set only. A second bootstrapped
//! set S' ≠ S of the same size needs all its members to have locked S', so S and S' share no
//! node: that takes 2N agents started with the same `--bootstrap-expect N` whose seeds split them
//! into two groups that never hear of each other — a configuration of two clusters, not a race.
//! With exactly N agents, every node's locked set is all N of them. A run that cannot agree (say
//! N + 1 agents) waits and says why instead of guessing.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use quiver_coordinator::MemberInfo;
use quiver_node_agent::transport::{NodeId, NodeIdentity, StreamHeader, StreamKind};
use quiver_proto::peer::{ControlRequest, ControlResponse, Opaque, control_request, control_response};
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, watch};

use super::Shared;
use super::names::decode_control_addr;

/// The control-request kind of a hello.
pub const KIND: &str = "expect";
/// The lock file, in the data directory.
pub const LOCK_FILE: &str = "bootstrap-expect.lock";
/// How often a waiting node repeats its hellos when nothing changes.
const PERIOD: Duration = Duration::from_millis(200);
/// First retry delay towards a peer that did not answer (doubles up to [`PERIOD`]).
const RETRY: Duration = Duration::from_millis(20);

/// What waiting nodes tell each other.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// The sender's `--bootstrap-expect`.
    pub expect: u32,
    /// Every node the sender has heard of, itself included.
    pub known: Vec<MemberInfo>,
    /// The set the sender locked, sorted by id, once it has.
    pub locked: Option<Vec<MemberInfo>>,
}

#[derive(Debug, Serialize, Deserialize)]
struct LockFile {
    expect: u32,
    members: Vec<MemberInfo>,
}

struct State {
    known: BTreeMap<u64, MemberInfo>,
    locked: Option<Vec<MemberInfo>>,
    /// Each peer's locked set as it last reported it.
    reports: BTreeMap<u64, Vec<MemberInfo>>,
    /// Set when more than `expect` nodes were heard of before locking.
    too_many: Option<String>,
}

/// One node's side of the discovery: answers other nodes' hellos and decides when to bootstrap.
pub struct Discovery {
    expect: u32,
    me: MemberInfo,
    lock_path: PathBuf,
    state: Mutex<State>,
    changed: Notify,
}

impl Discovery {
    /// Starts discovery for `me`, resuming a lock written before a crash.
    pub fn open(expect: u32, me: MemberInfo, data_dir: &Path) -> Result<Arc<Self>> {
        let lock_path = data_dir.join(LOCK_FILE);
        let mut known = BTreeMap::from([(me.id, me.clone())]);
        let locked = match std::fs::read(&lock_path) {
            Ok(bytes) => {
                let lock: LockFile = postcard::from_bytes(&bytes)
                    .with_context(|| format!("{}: undecodable; remove it to start over", lock_path.display()))?;
                if lock.expect != expect || !lock.members.iter().any(|m| m.id == me.id) {
                    bail!(
                        "{}: locked for --bootstrap-expect {} with nodes {:?}; this start asks for {expect}",
                        lock_path.display(),
                        lock.expect,
                        lock.members.iter().map(|m| m.id).collect::<Vec<_>>()
                    );
                }
                tracing::info!(path = %lock_path.display(), "resuming a bootstrap-expect lock");
                known.extend(lock.members.iter().map(|m| (m.id, m.clone())));
                Some(lock.members)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(e).with_context(|| format!("reading {}", lock_path.display())),
        };
        let state = State { known, locked, reports: BTreeMap::new(), too_many: None };
        Ok(Arc::new(Discovery { expect, me, lock_path, state: Mutex::new(state), changed: Notify::new() }))
    }

    /// On a node that already holds a cluster: keeps answering hellos from the set it locked (a
    /// peer may still be waiting for its agreement after this node bootstrapped and restarted).
    pub fn resume(me: MemberInfo, data_dir: &Path) -> Result<Option<Arc<Self>>> {
        let lock_path = data_dir.join(LOCK_FILE);
        let Ok(bytes) = std::fs::read(&lock_path) else { return Ok(None) };
        let lock: LockFile = postcard::from_bytes(&bytes)
            .with_context(|| format!("{}: undecodable; remove it to start over", lock_path.display()))?;
        Self::open(lock.expect, me, data_dir).map(Some)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("discovery lock")
    }

    /// This node's hello.
    pub fn hello(&self) -> Hello {
        let st = self.lock();
        Hello { expect: self.expect, known: st.known.values().cloned().collect(), locked: st.locked.clone() }
    }

    /// Takes in `hello` from node `from` (proved by its certificate). Errors name the refusal.
    pub fn merge(&self, from: NodeId, hello: Hello) -> Result<(), String> {
        if hello.expect != self.expect {
            return Err(format!(
                "--bootstrap-expect mismatch: node {} expects {} nodes, node {} expects {}",
                self.me.id, self.expect, from.0, hello.expect
            ));
        }
        if !hello.known.iter().any(|m| m.id == from.0) {
            return Err(format!("hello from node {} does not describe node {}", from.0, from.0));
        }
        let mut st = self.lock();
        let mut changed = false;
        if st.locked.is_none() {
            for m in hello.known {
                // A node's own hello is the authority on itself; others only introduce it.
                if m.id == self.me.id {
                    continue;
                }
                let own = m.id == from.0;
                match st.known.get(&m.id) {
                    Some(k) if k == &m || !own => {}
                    _ => {
                        st.known.insert(m.id, m);
                        changed = true;
                    }
                }
            }
        }
        if let Some(locked) = hello.locked
            && st.reports.get(&from.0) != Some(&locked)
        {
            st.reports.insert(from.0, locked);
            changed = true;
        }
        if st.locked.is_none() && st.known.len() > self.expect as usize && st.too_many.is_none() {
            let names: Vec<String> = st.known.values().map(name).collect();
            st.too_many = Some(format!(
                "--bootstrap-expect {}: heard of {} nodes ({}); start exactly {} agents with --bootstrap-expect and --join the others",
                self.expect,
                names.len(),
                names.join(", "),
                self.expect
            ));
            changed = true;
        }
        if st.locked.is_none() && st.known.len() == self.expect as usize {
            let set: Vec<MemberInfo> = st.known.values().cloned().collect();
            if let Err(e) = self.persist_lock(&set) {
                return Err(format!("locking the bootstrap set: {e:#}"));
            }
            tracing::info!(nodes = ?set.iter().map(name).collect::<Vec<_>>(), "bootstrap-expect: all expected nodes found; set locked");
            st.locked = Some(set);
            changed = true;
        }
        drop(st);
        if changed {
            self.changed.notify_waiters();
        }
        Ok(())
    }

    fn persist_lock(&self, members: &[MemberInfo]) -> Result<()> {
        use std::io::Write;
        let bytes = postcard::to_stdvec(&LockFile { expect: self.expect, members: members.to_vec() })?;
        let tmp = self.lock_path.with_extension("tmp");
        let mut f = std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        f.write_all(&bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, &self.lock_path).with_context(|| format!("writing {}", self.lock_path.display()))?;
        if let Some(dir) = self.lock_path.parent() {
            std::fs::File::open(dir)?.sync_all()?;
        }
        Ok(())
    }

    /// The agreed member list, once every node of the locked set reports that same set.
    pub fn agreed(&self) -> Result<Option<Vec<MemberInfo>>> {
        let st = self.lock();
        if let Some(e) = &st.too_many {
            bail!("{e}");
        }
        let Some(locked) = &st.locked else { return Ok(None) };
        let all = locked.iter().filter(|m| m.id != self.me.id).all(|m| st.reports.get(&m.id) == Some(locked));
        Ok(all.then(|| locked.clone()))
    }

    /// Peers to greet: every known node but this one, with its peer address.
    fn peers(&self) -> BTreeMap<u64, SocketAddr> {
        let st = self.lock();
        st.known
            .values()
            .filter(|m| m.id != self.me.id)
            .filter_map(|m| m.peer_addr.parse().ok().map(|a| (m.id, a)))
            .collect()
    }

    /// A line for the logs and `/readyz`: what is still missing.
    fn progress(&self) -> String {
        let st = self.lock();
        let names: Vec<String> = st.known.values().map(name).collect();
        match &st.locked {
            None => format!("waiting for {} nodes (--bootstrap-expect); found {}", self.expect, names.join(", ")),
            Some(set) => {
                let waiting: Vec<String> =
                    set.iter().filter(|m| m.id != self.me.id && st.reports.get(&m.id) != Some(set)).map(name).collect();
                format!("all {} nodes found; waiting for {} to agree", self.expect, waiting.join(", "))
            }
        }
    }
}

fn name(m: &MemberInfo) -> String {
    decode_control_addr(m.id, &m.control_addr).1
}

/// Answers a hello that arrived over QUIC from `from`: merges it and replies with ours.
pub fn answer(d: &Discovery, from: NodeId, body: &[u8]) -> Result<Vec<u8>, String> {
    let hello: Hello = postcard::from_bytes(body).map_err(|e| format!("expect: undecodable hello: {e}"))?;
    d.merge(from, hello)?;
    postcard::to_stdvec(&d.hello()).map_err(|e| format!("expect: encoding the hello: {e}"))
}

/// Greets the seeds and every node heard of until the set is agreed; returns the member list to
/// bootstrap with. Peers are greeted concurrently, each by its own task, so a seed that is not up
/// yet never delays the others.
pub async fn discover(
    shared: &Shared,
    identity: &NodeIdentity,
    seeds: &[SocketAddr],
    d: &Arc<Discovery>,
) -> Result<Vec<MemberInfo>> {
    let (done_tx, done) = watch::channel(false);
    let mut greeted = BTreeSet::new();
    for seed in seeds.iter().copied() {
        tokio::spawn(greet(shared.clone(), identity.clone(), d.clone(), None, seed, done.clone()));
    }
    let mut last_report = Instant::now();
    let result = loop {
        let changed = d.changed.notified();
        match d.agreed() {
            Ok(Some(set)) => break Ok(set),
            Ok(None) => {}
            Err(e) => break Err(e),
        }
        for (id, addr) in d.peers() {
            if greeted.insert(id) {
                tokio::spawn(greet(shared.clone(), identity.clone(), d.clone(), Some(NodeId(id)), addr, done.clone()));
            }
        }
        if last_report.elapsed() > Duration::from_secs(5) {
            last_report = Instant::now();
            tracing::info!("bootstrap-expect: {}", d.progress());
        }
        let _ = tokio::time::timeout(Duration::from_secs(1), changed).await;
    };
    let _ = done_tx.send(true);
    result
}

/// Greets one peer (known id, or a seed whose id the handshake reveals) until discovery is done.
async fn greet(
    shared: Shared,
    identity: NodeIdentity,
    d: Arc<Discovery>,
    mut id: Option<NodeId>,
    addr: SocketAddr,
    mut done: watch::Receiver<bool>,
) {
    let mut retry = RETRY;
    loop {
        if *done.borrow() {
            return;
        }
        let changed = d.changed.notified();
        let outcome = async {
            let peer = match id {
                Some(p) => p,
                None => {
                    let p = super::peer::discover(&identity, addr).await?;
                    id = Some(p);
                    p
                }
            };
            if peer.0 == d.me.id {
                return Ok(false);
            }
            let reply = call(&shared, peer, addr, &d.hello()).await?;
            d.merge(peer, reply).map_err(|e| anyhow!(e))?;
            Ok::<_, anyhow::Error>(true)
        }
        .await;
        let wait = match outcome {
            Ok(false) => return, // a seed that is this node itself
            Ok(true) => {
                retry = RETRY;
                PERIOD
            }
            Err(e) => {
                if e.is::<Refused>() {
                    tracing::warn!(%addr, error = %e, "bootstrap-expect: refused by a peer; retrying");
                } else {
                    tracing::debug!(%addr, error = %e, "bootstrap-expect: hello failed; retrying");
                }
                retry = (retry * 2).min(PERIOD);
                retry
            }
        };
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = changed => {}
            _ = done.changed() => {}
        }
    }
}

/// A peer answered a hello with an error (for example a different `--bootstrap-expect`).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Refused(String);

/// Waits for SIGTERM or SIGINT (the event loop, which normally handles them, is not running yet
/// while the node waits for the others).
pub async fn stop_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => std::future::pending().await,
    }
}

async fn call(shared: &Shared, peer: NodeId, addr: SocketAddr, hello: &Hello) -> Result<Hello> {
    let body = postcard::to_stdvec(hello)?;
    let exchange = async {
        let conn = shared.transport.connect(peer, addr).await?;
        let header = StreamHeader { kind: StreamKind::Control as i32, ..Default::default() };
        let (mut send, mut recv) = conn.open_bi(header).await?;
        let req = ControlRequest {
            request_id: 1,
            body: Some(control_request::Body::Opaque(Opaque { kind: KIND.into(), body })),
        };
        send.send_message(&req).await?;
        send.finish()?;
        let resp =
            recv.recv_message::<ControlResponse>().await?.ok_or_else(|| anyhow!("{peer} closed without answering"))?;
        match resp.body {
            Some(control_response::Body::Opaque(o)) if o.kind == KIND => {
                postcard::from_bytes(&o.body).context("undecodable hello")
            }
            Some(control_response::Body::Error(e)) => Err(anyhow!(Refused(format!("{peer}: {}", e.message)))),
            _ => bail!("{peer}: unexpected answer to a hello"),
        }
    };
    tokio::time::timeout(Duration::from_secs(2), exchange).await.map_err(|_| anyhow!("{peer} did not answer"))?
}
