//! The agent's one event loop (STYLE.md §2): it owns the [`CoordinatorCore`] and its Raft log,
//! and is the only code that touches them.
//!
//! Each turn takes one [`Event`] (plus whatever else is already queued, so a burst costs one
//! fsync), feeds it to the core, then carries out the core's `Effects` in the order the core's
//! docs demand: send `messages`, write (and fsync) `persist`, send `messages_after_persist`,
//! report `persisted`, answer the clients whose commands were applied. Last it publishes a
//! [`View`] for readers (gRPC, `/readyz`) and updates the gauges.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow};
use quiver_coordinator::state::{Liveness, Role};
use quiver_coordinator::{
    ClusterState, Command, CoordinatorCore, CoreStatus, DiskStore, LeaderHint, LogStore, MemberInfo, Op, Outbound,
    Outcome, ProposeError, RequestId,
};
use quiver_node_agent::transport::{NodeId, Transport};
use tokio::sync::{mpsc, oneshot, watch};

use super::peer;
use crate::http::Health;

/// Everything that can wake the loop. Closed: a new input is a new variant here.
pub enum Event {
    /// Raft messages that arrived on an authenticated connection from node `from`.
    Raft { from: u64, messages: Vec<Vec<u8>> },
    /// A client command to record through Raft. Answered once applied on this node (when it
    /// leads), or at once with [`ProposeReply::NotLeader`].
    Propose { cmd: Command, reply: oneshot::Sender<ProposeReply> },
    /// A task hit an error the agent cannot continue after (e.g. the join timed out).
    Fatal(String),
    /// SIGTERM or SIGINT: hand over leadership, flush, stop.
    Shutdown,
}

/// The answer to [`Event::Propose`].
#[derive(Debug)]
pub enum ProposeReply {
    /// Committed and applied, with this outcome.
    Applied(Outcome),
    /// This node does not lead; the hint names the leader when one is known.
    NotLeader(Option<LeaderHint>),
    /// Not recorded (leadership moved, raft dropped it); retrying with the same request id is safe.
    Failed(String),
}

/// A read-only snapshot of the node for the gRPC handlers and the health endpoint.
#[derive(Debug, Clone)]
pub struct View {
    pub node_id: u64,
    pub node_name: String,
    pub status: CoreStatus,
    pub state: Arc<ClusterState>,
    /// A member of a cluster that has a leader.
    pub ready: bool,
}

impl View {
    /// The view before the loop has run.
    pub fn empty(node_id: u64, node_name: &str) -> Self {
        View {
            node_id,
            node_name: node_name.to_string(),
            status: CoreStatus {
                id: node_id,
                term: 0,
                leader: 0,
                is_leader: false,
                commit: 0,
                applied: 0,
                last_index: 0,
                voters: vec![],
                learners: vec![],
            },
            state: Arc::new(ClusterState::default()),
            ready: false,
        }
    }
}

const TICK: Duration = Duration::from_millis(10);
/// A proposal not applied within this long is dropped (its caller has given up by then).
const PENDING_TTL: Duration = Duration::from_secs(10);
/// How long a leader shutting down waits for another voter to take over.
const HANDOVER: Duration = Duration::from_secs(1);
/// Raft messages queued per peer before new ones are dropped (Raft retransmits).
const OUTBOX: usize = 1024;

pub struct EventLoop {
    core: CoordinatorCore<DiskStore>,
    store: DiskStore,
    transport: Transport,
    health: Arc<Health>,
    view_tx: watch::Sender<Arc<View>>,
    me: MemberInfo,
    name: String,
    origin: Instant,
    outbox: HashMap<u64, mpsc::Sender<Vec<u8>>>,
    pending: HashMap<RequestId, Vec<(oneshot::Sender<ProposeReply>, Instant)>>,
    peers: BTreeMap<u64, String>,
    published: Option<(CoreStatus, u64)>,
    shutdown_since: Option<Instant>,
    /// `DATA_DIR/leaders.log`, when set: see [`EventLoop::with_leaders_log`].
    leaders_log: Option<std::path::PathBuf>,
}

impl EventLoop {
    pub fn new(
        core: CoordinatorCore<DiskStore>,
        store: DiskStore,
        transport: Transport,
        health: Arc<Health>,
        view_tx: watch::Sender<Arc<View>>,
        me: MemberInfo,
    ) -> Self {
        let name = view_tx.borrow().node_name.clone();
        EventLoop {
            core,
            store,
            transport,
            health,
            view_tx,
            me,
            name,
            origin: Instant::now(),
            outbox: HashMap::new(),
            pending: HashMap::new(),
            peers: BTreeMap::new(),
            published: None,
            shutdown_since: None,
            leaders_log: None,
        }
    }

    /// Appends a line `TERM LEADER_ID UNIX_MS` to `path` each time this node sees a new leader
    /// (not when it loses one): the node's own record that the chaos drills check for at most one
    /// leader per term. Not fsynced; a crash may lose the last lines, never invent one.
    pub fn with_leaders_log(mut self, path: std::path::PathBuf) -> Self {
        self.leaders_log = Some(path);
        self
    }

    fn record_leader(&self, leader: u64) {
        let Some(path) = &self.leaders_log else { return };
        if leader == 0 {
            return;
        }
        let ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis());
        let line = format!("{} {leader} {ms}\n", self.core.term());
        let written = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .and_then(|mut f| std::io::Write::write_all(&mut f, line.as_bytes()));
        if let Err(e) = written {
            tracing::warn!(path = %path.display(), error = %e, "cannot append to the leaders log");
        }
    }

    fn now(&self) -> Duration {
        self.origin.elapsed()
    }

    /// Runs until shutdown (Ok) or a fatal error.
    pub async fn run(mut self, mut events: mpsc::Receiver<Event>) -> Result<()> {
        self.sync_peers();
        let mut ticker = tokio::time::interval(TICK);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut last_sweep = Instant::now();
        loop {
            let first = tokio::select! {
                biased;
                ev = events.recv() => Some(ev.unwrap_or(Event::Shutdown)),
                _ = ticker.tick() => None,
            };
            let now = self.now();
            self.core.tick(now);
            let mut next = first;
            let mut budget = 256;
            while let Some(ev) = next.take() {
                self.handle(ev, now)?;
                budget -= 1;
                if budget > 0 {
                    next = events.try_recv().ok();
                }
            }
            self.drain()?;
            if last_sweep.elapsed() > Duration::from_secs(1) {
                last_sweep = Instant::now();
                self.pending.retain(|_, v| {
                    v.retain(|(tx, at)| !tx.is_closed() && at.elapsed() < PENDING_TTL);
                    !v.is_empty()
                });
            }
            self.publish();
            if let Some(since) = self.shutdown_since
                && (!self.core.is_leader() || since.elapsed() > HANDOVER || self.core.status().voters.len() < 2)
            {
                tracing::info!(leader = self.core.is_leader(), "event loop stopped; raft log is flushed");
                self.health.set_ready(false, "shutting down");
                self.fail_pending("the node is shutting down");
                return Ok(());
            }
        }
    }

    fn handle(&mut self, ev: Event, now: Duration) -> Result<()> {
        match ev {
            Event::Raft { from, messages } => {
                self.core.heartbeat(from, now);
                for m in messages {
                    if let Err(e) = self.core.step(from, &m) {
                        tracing::debug!(from, error = %e, "raft message refused");
                    }
                }
            }
            Event::Propose { cmd, reply } => match self.core.propose(&cmd) {
                Ok(()) => self.pending.entry(cmd.request).or_default().push((reply, Instant::now())),
                Err(ProposeError::NotLeader { leader }) => {
                    let _ = reply.send(ProposeReply::NotLeader(leader));
                }
                Err(ProposeError::Dropped(reason)) => {
                    let _ = reply.send(ProposeReply::Failed(reason));
                }
            },
            Event::Fatal(reason) => return Err(anyhow!(reason)),
            Event::Shutdown => {
                if self.shutdown_since.is_none() {
                    self.shutdown_since = Some(Instant::now());
                    self.hand_over_leadership();
                }
            }
        }
        Ok(())
    }

    /// A leader that stops hands over to a connected voter first, so the cluster does not wait
    /// out an election timeout.
    fn hand_over_leadership(&mut self) {
        if !self.core.is_leader() {
            return;
        }
        let status = self.core.status();
        let target =
            status.voters.iter().copied().find(|&v| v != self.me.id && self.transport.peer(NodeId(v)).is_some());
        if let Some(to) = target {
            tracing::info!(to, "transferring leadership before shutdown");
            self.core.transfer_leadership(to);
        }
    }

    /// Carries out every pending `Effects`, in the order the core requires.
    fn drain(&mut self) -> Result<()> {
        while let Some(fx) = self.core.ready() {
            for m in fx.messages {
                self.send(m);
            }
            if !fx.persist.is_empty() {
                let start = Instant::now();
                // Chaos drills (`failpoints` feature): a failed or crashed write around the fsync.
                fail::fail_point!(quiver_node_agent::failpoints::RAFT_PERSIST_BEFORE, |_| Err(anyhow!(
                    "writing the raft log: injected fsync failure (failpoint {})",
                    quiver_node_agent::failpoints::RAFT_PERSIST_BEFORE
                )));
                // Synchronous on purpose: nothing below may happen before the log is durable, and
                // the core must not be touched concurrently. A failed write leaves the disk state
                // unknown, so the node stops rather than vote or acknowledge on a guess.
                self.store.persist(&fx.persist).context("writing the raft log")?;
                fail::fail_point!(quiver_node_agent::failpoints::RAFT_PERSIST_AFTER);
                metrics::histogram!("quiver_raft_persist_seconds").record(start.elapsed().as_secs_f64());
            }
            for m in fx.messages_after_persist {
                self.send(m);
            }
            self.core.persisted(fx.ticket);
            let mut membership_changed = fx.installed_snapshot.is_some() || !fx.conf_changes.is_empty();
            for a in fx.applied {
                if matches!(a.command.op, Op::Join(_) | Op::Leave { .. }) {
                    membership_changed = true;
                }
                if let Some(waiters) = self.pending.remove(&a.command.request) {
                    for (tx, at) in waiters {
                        metrics::histogram!("quiver_raft_commit_latency_seconds").record(at.elapsed().as_secs_f64());
                        let _ = tx.send(ProposeReply::Applied(a.outcome.clone()));
                    }
                }
            }
            if let Some(leader) = fx.leader_changed {
                metrics::counter!("quiver_raft_leader_changes_total").increment(1);
                tracing::info!(leader, term = self.core.term(), "leader changed");
                self.record_leader(leader);
                if leader != self.me.id {
                    self.fail_pending("leadership moved to another node");
                }
            }
            if membership_changed {
                self.sync_peers();
            }
        }
        Ok(())
    }

    fn fail_pending(&mut self, reason: &str) {
        for (_, waiters) in self.pending.drain() {
            for (tx, _) in waiters {
                let _ = tx.send(ProposeReply::Failed(reason.to_string()));
            }
        }
    }

    fn send(&mut self, m: Outbound) {
        let Outbound { to, bytes } = m;
        let tx = self.outbox.entry(to).or_insert_with(|| {
            let (tx, rx) = mpsc::channel(OUTBOX);
            tokio::spawn(peer::raft_sender(self.transport.clone(), self.me.id, to, rx));
            tx
        });
        match tx.try_send(bytes) {
            Ok(()) => metrics::counter!("quiver_raft_messages_sent_total").increment(1),
            Err(_) => metrics::counter!("quiver_raft_messages_dropped_total").increment(1),
        }
    }

    /// Keeps a QUIC connection to every other member at the address it reported.
    fn sync_peers(&mut self) {
        let members: BTreeMap<u64, String> = self
            .core
            .state()
            .members
            .iter()
            .filter(|(id, _)| **id != self.me.id)
            .map(|(id, m)| (*id, m.info.peer_addr.clone()))
            .collect();
        for (id, addr) in &members {
            if self.peers.get(id) == Some(addr) {
                continue;
            }
            match addr.parse::<SocketAddr>() {
                Ok(a) => self.transport.add_peer(NodeId(*id), a),
                Err(e) => tracing::warn!(node = id, addr, error = %e, "member reported an unusable peer address"),
            }
        }
        for id in self.peers.keys() {
            if !members.contains_key(id) {
                self.transport.remove_peer(NodeId(*id));
                self.outbox.remove(id);
            }
        }
        self.peers = members;
    }

    fn publish(&mut self) {
        let status = self.core.status();
        let state = self.core.state();
        let applied = state.applied_index;
        if self.published.as_ref().is_some_and(|(s, a)| *s == status && *a == applied) {
            return;
        }
        let member = state.members.contains_key(&self.me.id);
        let ready = member && status.leader != 0 && self.shutdown_since.is_none();
        let reason = if !member {
            "not a member of a cluster yet".to_string()
        } else if status.leader == 0 {
            "no leader known".to_string()
        } else {
            String::new()
        };
        self.health.set_ready(ready, reason);
        metrics::gauge!("quiver_raft_term").set(status.term as f64);
        metrics::gauge!("quiver_raft_commit_index").set(status.commit as f64);
        metrics::gauge!("quiver_raft_is_leader").set(if status.is_leader { 1.0 } else { 0.0 });
        let mut by_state: BTreeMap<(&str, &str), u64> = BTreeMap::new();
        for m in state.members.values() {
            let role = match m.role {
                Role::Voter => "voter",
                Role::Learner => "learner",
            };
            let live = match m.liveness {
                Liveness::Alive => "alive",
                Liveness::Down => "down",
            };
            *by_state.entry((live, role)).or_default() += 1;
        }
        for live in ["alive", "down"] {
            for role in ["voter", "learner"] {
                let n = by_state.get(&(live, role)).copied().unwrap_or(0);
                metrics::gauge!("quiver_cluster_members", "state" => live, "role" => role).set(n as f64);
            }
        }
        let view = View {
            node_id: self.me.id,
            node_name: self.name.clone(),
            status: status.clone(),
            state: Arc::new(state.clone()),
            ready,
        };
        self.view_tx.send_replace(Arc::new(view));
        self.published = Some((status, applied));
    }
}
