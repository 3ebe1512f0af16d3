//! [`CoordinatorCore`]: raft-rs's `RawNode`, the cluster state machine and the leader's duties
//! (liveness, autopilot, placement) behind one sans-IO interface.
//!
//! The core opens no socket, reads no clock, starts no thread and draws no unseeded random number.
//! Time enters as an argument (`tick(now)`, `heartbeat(node, now)`) measured from any origin the
//! driver likes; randomness (election timeouts) comes from [`CoreConfig::seed`]. Two cores fed the
//! same inputs produce the same outputs, which is what the simulation in `quiver-tests` relies on.
//!
//! # Driving it
//!
//! Inputs (call any time, in any order, from one thread):
//! - [`step`](CoordinatorCore::step): a Raft message that arrived from an authenticated peer;
//! - [`tick`](CoordinatorCore::tick): the current time, every few milliseconds (at least once per
//!   [`CoreConfig::tick_interval`]);
//! - [`heartbeat`](CoordinatorCore::heartbeat): a node agent reported in;
//! - [`propose`](CoordinatorCore::propose): a client command; on a follower this answers
//!   [`ProposeError::NotLeader`] with the leader's id and addresses, and the driver forwards;
//! - [`persisted`](CoordinatorCore::persisted): the driver finished writing a [`Persist`] batch.
//!
//! Output: after inputs, while [`has_ready`](CoordinatorCore::has_ready), take one [`Effects`] with
//! [`ready`](CoordinatorCore::ready) and carry it out **in this order**:
//! 1. send [`Effects::messages`] (a leader's appends may travel while it persists: Raft thesis
//!    §10.2.1);
//! 2. write [`Effects::persist`] with [`LogStore::persist`] (fsync when it says so);
//! 3. only then send [`Effects::messages_after_persist`] (votes and acknowledgements promise that
//!    the data is on disk) and call [`persisted`](CoordinatorCore::persisted) with
//!    [`Effects::ticket`];
//! 4. act on [`Effects::applied`]: these commands are committed and already applied to
//!    [`state`](CoordinatorCore::state) in log order; answer the clients waiting for them.
//!
//! Only committed entries are ever applied, and only after they are durable on this node (raft-rs
//! hands out committed entries up to the persisted index only).
//!
//! # Untrusted bytes
//!
//! Raft messages are rust-protobuf 2 types; rust-protobuf 2.28 has a stack-overflow advisory on
//! crafted input (RUSTSEC-2024-0437). They travel as opaque bytes and are parsed in exactly one
//! place, [`CoordinatorCore::step`], which the driver must only call for bytes that arrived on an
//! authenticated (mutual-TLS) peer connection, passing the peer id that connection proved.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use protobuf::Message as _;
use raft::eraftpb::{
    ConfChange, ConfChangeSingle, ConfChangeType, ConfChangeV2, ConfState, Entry, EntryType, Message, MessageType,
    Snapshot,
};
use raft::{RawNode, StateRole, Storage};

use crate::codec::{self, DecodeError};
use crate::rng::DetRng;
use crate::scheduler::{self, SpeedModel};
use crate::state::{ClusterState, Command, Liveness, MemberInfo, NodeId, Op, Outcome, RequestId};
use crate::storage::{LogStore, Persist, StoreError};

/// Settings of one coordinator core.
#[derive(Debug, Clone)]
pub struct CoreConfig {
    /// This node's id (never 0).
    pub id: NodeId,
    /// Length of one Raft tick.
    pub tick_interval: Duration,
    /// Ticks without hearing from a leader before a follower campaigns (randomised in
    /// `[election_ticks, 2 × election_ticks)`).
    pub election_ticks: usize,
    /// Ticks between a leader's heartbeats.
    pub heartbeat_ticks: usize,
    /// A member whose agent has not reported for this long is marked down (default 1 s).
    pub down_after: Duration,
    /// A voter down for this long is replaced by a healthy learner.
    pub voter_grace: Duration,
    /// Take a snapshot of the state machine every this many applied entries.
    pub snapshot_every: u64,
    /// Entries kept before the snapshot index when compacting (so slightly lagging followers catch
    /// up from the log instead of a snapshot).
    pub compact_lag: u64,
    /// How long the leader waits before re-proposing a duty (mark-down, placement) that did not
    /// apply, e.g. because leadership changed.
    pub duty_retry: Duration,
    /// Seed for every random choice.
    pub seed: u64,
}

impl CoreConfig {
    /// Defaults tuned for sub-second failover: 10 ms ticks, 130–260 ms election timeout,
    /// 40 ms heartbeats, 1 s down-detection, 3 s voter grace.
    ///
    /// The election window is chosen so that even a split vote (two followers timing out within
    /// a round trip of each other, a few percent of failovers) resolves within 600 ms:
    /// at worst one full window to the first election plus one more to the second.
    pub fn new(id: NodeId) -> Self {
        CoreConfig {
            id,
            tick_interval: Duration::from_millis(10),
            election_ticks: 13,
            heartbeat_ticks: 4,
            down_after: Duration::from_secs(1),
            voter_grace: Duration::from_secs(3),
            snapshot_every: 1024,
            compact_lag: 128,
            duty_retry: Duration::from_secs(1),
            seed: id,
        }
    }

    fn raft_config(&self, applied: u64) -> raft::Config {
        raft::Config {
            id: self.id,
            election_tick: self.election_ticks,
            heartbeat_tick: self.heartbeat_ticks,
            applied,
            max_size_per_msg: 1 << 20,
            max_inflight_msgs: 256,
            check_quorum: true,
            pre_vote: true,
            ..Default::default()
        }
    }
}

/// How many voters the autopilot keeps for a cluster of `members` nodes: 5 from 7 nodes, 3 from 3,
/// otherwise 1 (a second voter would add a failure point without adding fault tolerance).
pub fn voter_target(members: usize) -> usize {
    match members {
        0..=2 => 1,
        3..=6 => 3,
        _ => 5,
    }
}

/// The snapshot a new cluster starts from: these members, the lowest ids voters (up to
/// [`voter_target`]), the rest learners. Every node of a `bootstrap-expect` cluster must build it
/// from the same member list.
pub fn bootstrap_snapshot(members: &[MemberInfo]) -> Snapshot {
    let mut ids: Vec<NodeId> = members.iter().map(|m| m.id).collect();
    ids.sort_unstable();
    ids.dedup();
    let voters: Vec<NodeId> = ids.iter().copied().take(voter_target(ids.len())).collect();
    let learners: Vec<NodeId> = ids.iter().copied().skip(voters.len()).collect();
    let mut state = ClusterState::bootstrap(members, &voters);
    state.skip(1);
    let mut snap = Snapshot { data: codec::encode_state(&state).into(), ..Default::default() };
    let meta = snap.mut_metadata();
    meta.index = 1;
    meta.term = 1;
    meta.mut_conf_state().voters = voters;
    meta.mut_conf_state().learners = learners;
    snap
}

/// Writes the bootstrap snapshot into an empty store (`--bootstrap` with one member, or
/// `--bootstrap-expect N` with all N). Refuses a store that already holds a cluster.
pub fn bootstrap<S: LogStore>(store: &S, members: &[MemberInfo]) -> Result<(), BootstrapError> {
    let initial = store.initial_state().map_err(|e| BootstrapError::Read(e.to_string()))?;
    if initial.initialized() {
        return Err(BootstrapError::AlreadyInitialized);
    }
    if members.is_empty() || members.iter().any(|m| m.id == 0) {
        return Err(BootstrapError::BadMembers);
    }
    let batch = Persist { snapshot: Some(bootstrap_snapshot(members)), sync: true, ..Default::default() };
    store.persist(&batch).map_err(BootstrapError::Store)
}

/// Why [`bootstrap`] refused.
#[derive(Debug, thiserror::Error)]
pub enum BootstrapError {
    /// The store already holds a cluster's log.
    #[error("bootstrap: the raft log already holds a cluster; start without --bootstrap to rejoin it")]
    AlreadyInitialized,
    /// No members, or a member with id 0.
    #[error("bootstrap: the member list must be non-empty and ids must be non-zero")]
    BadMembers,
    /// Reading the store failed.
    #[error("bootstrap: reading the raft log: {0}")]
    Read(String),
    /// Writing the store failed.
    #[error("bootstrap: {0}")]
    Store(#[source] StoreError),
}

/// Why [`CoordinatorCore::open`] failed.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// raft-rs refused the configuration or the stored state.
    #[error("opening raft node: {0}")]
    Raft(#[from] raft::Error),
    /// The stored snapshot did not decode.
    #[error("opening raft node: stored {0}")]
    Snapshot(#[from] DecodeError),
}

/// Why a peer message was refused by [`CoordinatorCore::step`].
#[derive(Debug, thiserror::Error)]
pub enum StepError {
    /// The bytes are not a Raft message.
    #[error("raft message from node {from}: malformed: {reason}")]
    Malformed { from: NodeId, reason: String },
    /// The message claims another sender than the connection proved.
    #[error("raft message from node {from}: claims to come from node {claimed}")]
    WrongSender { from: NodeId, claimed: NodeId },
    /// The message is addressed to another node.
    #[error("raft message from node {from}: addressed to node {to}, this is node {me}")]
    WrongRecipient { from: NodeId, to: NodeId, me: NodeId },
    /// A message type peers must not send (local messages, proposals).
    #[error("raft message from node {from}: type {kind:?} is not accepted from peers")]
    Forbidden { from: NodeId, kind: MessageType },
    /// raft-rs refused it (e.g. a response from a node not in the configuration).
    #[error("raft message from node {from}: {source}")]
    Raft {
        from: NodeId,
        #[source]
        source: raft::Error,
    },
}

/// Where to send a proposal when this node is not the leader.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaderHint {
    /// The leader's node id.
    pub id: NodeId,
    /// Its peer address, if it is a known member.
    pub peer_addr: Option<String>,
    /// Its control-plane address, if it is a known member.
    pub control_addr: Option<String>,
}

/// Why a proposal was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProposeError {
    /// This node is not the leader; forward to the hint (or retry later when there is none).
    #[error("not the leader{}", .leader.as_ref().map(|l| format!("; the leader is node {}", l.id)).unwrap_or_else(|| ", and no leader is known".into()))]
    NotLeader {
        /// The leader, when one is known.
        leader: Option<LeaderHint>,
    },
    /// raft-rs dropped it (leadership transfer in progress, or a conf change already pending).
    #[error("proposal dropped by raft: {0}")]
    Dropped(String),
}

/// A Raft message to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outbound {
    /// Destination node.
    pub to: NodeId,
    /// Encoded raft-rs message; opaque to everyone but the receiving core.
    pub bytes: Vec<u8>,
}

/// A committed command, applied to the state machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    /// Its log index.
    pub index: u64,
    /// Its term.
    pub term: u64,
    /// The command.
    pub command: Command,
    /// Its outcome (the original one when `duplicate`).
    pub outcome: Outcome,
    /// The request had been applied before; this entry was a retry and changed nothing.
    pub duplicate: bool,
}

/// A configuration change that was applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfApplied {
    /// Its log index.
    pub index: u64,
    /// Voters after the change.
    pub voters: Vec<NodeId>,
    /// Learners after the change.
    pub learners: Vec<NodeId>,
}

/// Everything one turn asks of the driver; see the module docs for the order.
#[derive(Debug, Default)]
pub struct Effects {
    /// Hand to [`CoordinatorCore::persisted`] after writing `persist`.
    pub ticket: u64,
    /// Messages that may be sent right away.
    pub messages: Vec<Outbound>,
    /// What to write durably.
    pub persist: Persist,
    /// Messages to send only after `persist` is durable.
    pub messages_after_persist: Vec<Outbound>,
    /// Committed commands applied this turn, in log order.
    pub applied: Vec<Applied>,
    /// Configuration changes applied this turn.
    pub conf_changes: Vec<ConfApplied>,
    /// The state machine was replaced by a snapshot from the leader at this index.
    pub installed_snapshot: Option<u64>,
    /// The known leader changed (0 = none known).
    pub leader_changed: Option<NodeId>,
}

/// A summary for status endpoints and tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CoreStatus {
    /// This node.
    pub id: NodeId,
    /// Current term.
    pub term: u64,
    /// Known leader (0 = none).
    pub leader: NodeId,
    /// Whether this node leads.
    pub is_leader: bool,
    /// Commit index.
    pub commit: u64,
    /// Applied index.
    pub applied: u64,
    /// Last log index.
    pub last_index: u64,
    /// Voters (sorted).
    pub voters: Vec<NodeId>,
    /// Learners (sorted).
    pub learners: Vec<NodeId>,
}

/// Something the leader proposed on its own initiative, remembered to avoid re-proposing it every
/// tick while it is in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Duty {
    MarkDown(NodeId),
    MarkUp(NodeId),
    Place { job: u64, epoch: u64 },
    ConfChange,
}

/// The sans-IO coordinator; see the module docs.
pub struct CoordinatorCore<S: Storage> {
    cfg: CoreConfig,
    raw: RawNode<S>,
    state: ClusterState,
    rng: DetRng,
    now: Duration,
    last_tick: Option<Duration>,
    /// `(term, role)` when the election timeout was last drawn, and the value drawn.
    timeout_key: (u64, StateRole),
    timeout: usize,
    /// Agent heartbeats (leader-local, not replicated).
    last_seen: BTreeMap<NodeId, Duration>,
    leader_since: Option<Duration>,
    duties: BTreeMap<Duty, Duration>,
    speeds: SpeedModel,
    last_snapshot_index: u64,
    last_applied_term: u64,
    /// Applied index to report to raft once the pending ready (with a snapshot) is persisted.
    apply_after_persist: u64,
    /// A configuration change applied since the last snapshot: snapshot now, so nodes it added
    /// can be sent a snapshot whose configuration includes them.
    conf_changed: bool,
    /// Snapshots in flight to followers, by destination and send time (leader-local).
    snapshots_sent: BTreeMap<NodeId, Duration>,
    known_leader: NodeId,
}

impl<S: Storage> std::fmt::Debug for CoordinatorCore<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CoordinatorCore").field("status", &self.status()).finish_non_exhaustive()
    }
}

impl<S: Storage> CoordinatorCore<S> {
    /// Opens a core over `store`: the state machine is restored from the store's latest snapshot,
    /// and the committed entries after it are re-applied through the first [`ready`](Self::ready)s.
    /// An empty store gives a node that waits to be added by a leader (a joining node).
    pub fn open(cfg: CoreConfig, store: S, logger: &slog::Logger) -> Result<Self, OpenError> {
        // `to = 0`: our own latest snapshot, whatever its configuration.
        let (state, snap_index, snap_term) = match store.snapshot(0, 0) {
            Ok(snap) if !snap.data.is_empty() => {
                let meta = snap.get_metadata();
                let mut state = codec::decode_state(&snap.data)?;
                state.skip(meta.index);
                (state, meta.index, meta.term)
            }
            _ => (ClusterState::default(), 0, 0),
        };
        let raw = RawNode::new(&cfg.raft_config(snap_index), store, logger)?;
        let mut core = CoordinatorCore {
            rng: DetRng::new(cfg.seed),
            raw,
            state,
            now: Duration::ZERO,
            last_tick: None,
            timeout_key: (u64::MAX, StateRole::Follower),
            timeout: 0,
            last_seen: BTreeMap::new(),
            leader_since: None,
            duties: BTreeMap::new(),
            speeds: SpeedModel::default(),
            last_snapshot_index: snap_index,
            last_applied_term: snap_term,
            apply_after_persist: 0,
            conf_changed: false,
            snapshots_sent: BTreeMap::new(),
            known_leader: 0,
            cfg,
        };
        core.fix_election_timeout();
        Ok(core)
    }

    // ---- getters ----

    /// This node's id.
    pub fn id(&self) -> NodeId {
        self.cfg.id
    }

    /// The replicated state as of the last applied entry.
    pub fn state(&self) -> &ClusterState {
        &self.state
    }

    /// Whether this node is the leader.
    pub fn is_leader(&self) -> bool {
        self.raw.raft.state == StateRole::Leader
    }

    /// The leader this node knows of, with its addresses when it is a member.
    pub fn leader_hint(&self) -> Option<LeaderHint> {
        let id = self.raw.raft.leader_id;
        (id != 0).then(|| {
            let member = self.state.members.get(&id);
            LeaderHint {
                id,
                peer_addr: member.map(|m| m.info.peer_addr.clone()),
                control_addr: member.map(|m| m.info.control_addr.clone()),
            }
        })
    }

    /// Current term.
    pub fn term(&self) -> u64 {
        self.raw.raft.term
    }

    /// A status summary.
    pub fn status(&self) -> CoreStatus {
        let raft = &self.raw.raft;
        let cs = raft.prs().conf().to_conf_state();
        let mut voters = cs.voters;
        let mut learners = cs.learners;
        voters.sort_unstable();
        learners.sort_unstable();
        CoreStatus {
            id: self.cfg.id,
            term: raft.term,
            leader: raft.leader_id,
            is_leader: raft.state == StateRole::Leader,
            commit: raft.raft_log.committed,
            applied: raft.raft_log.applied,
            last_index: raft.raft_log.last_index(),
            voters,
            learners,
        }
    }

    /// The learned speed model (leader-local).
    pub fn speeds(&self) -> &SpeedModel {
        &self.speeds
    }

    // ---- inputs ----

    /// Feeds a Raft message that arrived on an authenticated peer connection from node `from`.
    ///
    /// This is the only place Raft's protobuf messages are parsed (see the module docs on
    /// RUSTSEC-2024-0437): never call it with bytes from an unauthenticated source.
    pub fn step(&mut self, from: NodeId, bytes: &[u8]) -> Result<(), StepError> {
        let msg = Message::parse_from_bytes(bytes).map_err(|e| StepError::Malformed { from, reason: e.to_string() })?;
        if msg.from != from {
            return Err(StepError::WrongSender { from, claimed: msg.from });
        }
        if msg.to != self.cfg.id {
            return Err(StepError::WrongRecipient { from, to: msg.to, me: self.cfg.id });
        }
        let kind = msg.get_msg_type();
        let forbidden = matches!(
            kind,
            MessageType::MsgHup
                | MessageType::MsgBeat
                | MessageType::MsgUnreachable
                | MessageType::MsgSnapStatus
                | MessageType::MsgCheckQuorum
                | MessageType::MsgPropose
        );
        if forbidden {
            return Err(StepError::Forbidden { from, kind });
        }
        let result = self.raw.step(msg);
        self.fix_election_timeout();
        result.map_err(|source| StepError::Raft { from, source })
    }

    /// Advances time to `now` (any monotonic origin): runs the due Raft ticks and, on the leader,
    /// the duties (liveness, autopilot, placement of jobs).
    pub fn tick(&mut self, now: Duration) {
        self.now = self.now.max(now);
        let interval = self.cfg.tick_interval.max(Duration::from_millis(1));
        let mut last = *self.last_tick.get_or_insert(self.now);
        // After a long stall (a paused process) run at most one election's worth of ticks: more
        // would only repeat the same timeouts.
        let max_ticks = 2 * self.cfg.election_ticks as u32 + 1;
        let mut ticks = 0;
        while last + interval <= self.now {
            last += interval;
            if ticks < max_ticks {
                self.raw.tick();
                self.fix_election_timeout();
                ticks += 1;
            }
        }
        self.last_tick = Some(last);
        if ticks > 0 && self.is_leader() {
            self.leader_duties();
        }
    }

    /// Records that node `node`'s agent reported in at `now`.
    pub fn heartbeat(&mut self, node: NodeId, now: Duration) {
        let seen = self.last_seen.entry(node).or_insert(now);
        *seen = (*seen).max(now);
    }

    /// Reports whether a snapshot message to `node` was delivered (the transport knows; without
    /// this report the core assumes failure after a timeout).
    pub fn report_snapshot(&mut self, node: NodeId, delivered: bool) {
        self.snapshots_sent.remove(&node);
        let status = if delivered { raft::SnapshotStatus::Finish } else { raft::SnapshotStatus::Failure };
        self.raw.report_snapshot(node, status);
    }

    /// Records a throughput report (work units per second) for the placement speed model.
    pub fn report_throughput(&mut self, node: NodeId, units_per_sec: f64) {
        self.speeds.observe(node, units_per_sec);
    }

    /// Proposes a client command. `Ok` means it entered the leader's log, not that it committed:
    /// the outcome arrives in [`Effects::applied`] (on this node, once committed). Retry a
    /// timed-out request with the same [`RequestId`]; it is applied at most once.
    pub fn propose(&mut self, cmd: &Command) -> Result<(), ProposeError> {
        if !self.is_leader() {
            return Err(ProposeError::NotLeader { leader: self.leader_hint() });
        }
        self.raw.propose(vec![], codec::encode_command(cmd)).map_err(|e| ProposeError::Dropped(e.to_string()))
    }

    /// Asks the leader to hand leadership to voter `to` (a graceful shutdown does this so the
    /// cluster need not wait out an election timeout). Does nothing on a follower.
    pub fn transfer_leadership(&mut self, to: NodeId) {
        if self.is_leader() && to != self.cfg.id {
            self.raw.transfer_leader(to);
        }
    }

    /// Whether [`ready`](Self::ready) has work.
    pub fn has_ready(&self) -> bool {
        self.raw.has_ready()
    }

    /// Takes this turn's effects, applying the newly committed entries to the state machine.
    /// Returns `None` when there is nothing to do.
    pub fn ready(&mut self) -> Option<Effects> {
        if !self.raw.has_ready() {
            return None;
        }
        let mut rd = self.raw.ready();
        let mut fx = Effects { ticket: rd.number(), ..Default::default() };
        if let Some(ss) = rd.ss()
            && ss.leader_id != self.known_leader
        {
            self.known_leader = ss.leader_id;
            fx.leader_changed = Some(ss.leader_id);
        }
        let now = self.now;
        for m in rd.messages().iter().chain(rd.persisted_messages()) {
            if m.get_msg_type() == MessageType::MsgSnapshot {
                self.snapshots_sent.insert(m.to, now);
            }
        }
        fx.messages = self.encode_messages(rd.take_messages());
        fx.messages_after_persist = self.encode_messages(rd.take_persisted_messages());
        if !rd.snapshot().is_empty() {
            let snap = rd.snapshot().clone();
            self.install_snapshot(&snap, &mut fx);
            fx.persist.snapshot = Some(snap);
        }
        fx.persist.entries = rd.take_entries();
        fx.persist.hard_state = rd.hs().cloned();
        fx.persist.sync = rd.must_sync();
        let committed = rd.take_committed_entries();
        self.raw.advance_append_async(rd);
        self.apply_entries(committed, &mut fx);
        self.maybe_checkpoint(&mut fx);
        self.fix_election_timeout();
        Some(fx)
    }

    /// Reports that the [`Persist`] of the effects with this ticket (and all earlier ones) is
    /// durable.
    pub fn persisted(&mut self, ticket: u64) {
        self.raw.on_persist_ready(ticket);
        let log = &self.raw.raft.raft_log;
        let ceiling = log.committed.min(log.persisted);
        if self.apply_after_persist > log.applied && self.apply_after_persist <= ceiling {
            self.raw.advance_apply_to(self.apply_after_persist);
            self.apply_after_persist = 0;
        }
        self.fix_election_timeout();
    }

    // ---- internals ----

    fn encode_messages(&self, msgs: Vec<Message>) -> Vec<Outbound> {
        msgs.into_iter()
            .filter_map(|m| match m.write_to_bytes() {
                Ok(bytes) => Some(Outbound { to: m.to, bytes }),
                Err(_) => None,
            })
            .collect()
    }

    fn install_snapshot(&mut self, snap: &Snapshot, fx: &mut Effects) {
        let meta = snap.get_metadata();
        // The leader's snapshot came over an authenticated connection and raft-rs accepted it;
        // a state that fails to decode means a version mismatch, and keeping the old state is the
        // least harmful choice (the log will be replayed over it).
        if let Ok(mut state) = codec::decode_state(&snap.data) {
            state.skip(meta.index);
            self.state = state;
            fx.installed_snapshot = Some(meta.index);
        }
        self.last_snapshot_index = meta.index;
        self.last_applied_term = meta.term;
        self.apply_after_persist = meta.index;
    }

    fn apply_entries(&mut self, committed: Vec<Entry>, fx: &mut Effects) {
        let Some(last) = committed.last().map(|e| e.index) else { return };
        for entry in committed {
            let index = entry.index;
            self.last_applied_term = entry.term;
            match entry.get_entry_type() {
                EntryType::EntryNormal if entry.data.is_empty() => self.state.skip(index),
                EntryType::EntryNormal => match codec::decode_command(&entry.data) {
                    Ok(command) => {
                        let result = self.state.apply(index, &command);
                        fx.applied.push(Applied {
                            index,
                            term: entry.term,
                            command,
                            outcome: result.outcome,
                            duplicate: result.duplicate,
                        });
                    }
                    Err(_) => self.state.skip(index),
                },
                EntryType::EntryConfChange => match ConfChange::parse_from_bytes(&entry.data) {
                    Ok(cc) => {
                        let result = self.raw.apply_conf_change(&cc);
                        self.conf_applied(index, result, fx);
                    }
                    Err(_) => self.state.skip(index),
                },
                EntryType::EntryConfChangeV2 => match ConfChangeV2::parse_from_bytes(&entry.data) {
                    Ok(cc) => {
                        let result = self.raw.apply_conf_change(&cc);
                        self.conf_applied(index, result, fx);
                    }
                    Err(_) => self.state.skip(index),
                },
            }
        }
        self.raw.advance_apply_to(last);
    }

    fn conf_applied(&mut self, index: u64, result: raft::Result<ConfState>, fx: &mut Effects) {
        match result {
            Ok(cs) => {
                self.conf_changed = true;
                let ConfState { mut voters, mut learners, .. } = cs;
                voters.sort_unstable();
                learners.sort_unstable();
                self.state.set_roles(index, &voters);
                fx.conf_changes.push(ConfApplied { index, voters, learners });
            }
            // raft-rs validates changes at proposal time; one that still fails to apply is
            // skipped identically on every replica.
            Err(_) => self.state.skip(index),
        }
    }

    fn maybe_checkpoint(&mut self, fx: &mut Effects) {
        let applied = self.state.applied_index;
        let due = applied >= self.last_snapshot_index.saturating_add(self.cfg.snapshot_every);
        if !(due || self.conf_changed) || applied == 0 || applied <= self.last_snapshot_index {
            return;
        }
        self.conf_changed = false;
        fx.persist.checkpoint = Some(self.snapshot_now());
        fx.persist.compact_to = applied.saturating_sub(self.cfg.compact_lag);
        self.last_snapshot_index = applied;
    }

    /// A snapshot of the state machine at the applied index, with the configuration as of it.
    pub fn snapshot_now(&self) -> Snapshot {
        let mut snap = Snapshot { data: codec::encode_state(&self.state).into(), ..Default::default() };
        let meta = snap.mut_metadata();
        meta.index = self.state.applied_index;
        meta.term = self.last_applied_term;
        *meta.mut_conf_state() = self.raw.raft.prs().conf().to_conf_state();
        snap
    }

    /// raft-rs draws election timeouts from the thread RNG whenever it resets its term state.
    /// After every call into it, replace that draw with one from our seeded RNG: a new draw when
    /// `(term, role)` changed, otherwise the previous value. The result is a function of the seed
    /// and the inputs alone (a reset that raft-rs did without changing term or role keeps the old
    /// timeout, identically on every run).
    fn fix_election_timeout(&mut self) {
        let raft = &mut self.raw.raft;
        let key = (raft.term, raft.state);
        let min = self.cfg.election_ticks;
        if key != self.timeout_key {
            self.timeout_key = key;
            self.timeout = min + self.rng.below(min as u64) as usize;
        }
        if raft.randomized_election_timeout() != self.timeout {
            raft.set_randomized_election_timeout(self.timeout);
        }
    }

    /// Whether a duty was never proposed or its last proposal is older than the retry period.
    fn duty_due(&self, duty: Duty) -> bool {
        self.duties.get(&duty).is_none_or(|&at| self.now.saturating_sub(at) >= self.cfg.duty_retry)
    }

    fn propose_internal(&mut self, duty: Duty, op: Op) {
        if !self.duty_due(duty) {
            return;
        }
        let cmd = Command { request: RequestId::internal(), op };
        if self.raw.propose(vec![], codec::encode_command(&cmd)).is_ok() {
            self.duties.insert(duty, self.now);
        }
    }

    fn leader_duties(&mut self) {
        let now = self.now;
        let since = *self.leader_since.get_or_insert(now);
        if self.raw.raft.leader_id != self.cfg.id {
            return;
        }
        self.last_seen.insert(self.cfg.id, now);
        // Liveness: members that missed their deadline go down, down members heard from come up.
        let mut changes = Vec::new();
        for (&id, member) in &self.state.members {
            let seen = self.last_seen.get(&id).copied().unwrap_or(since).max(since);
            let late = now.saturating_sub(seen) > self.cfg.down_after;
            match (member.liveness, late) {
                (Liveness::Alive, true) => changes.push((Duty::MarkDown(id), Op::MarkDown { node: id })),
                (Liveness::Down, false) => changes.push((Duty::MarkUp(id), Op::MarkUp { node: id })),
                _ => {}
            }
        }
        for (duty, op) in changes {
            self.propose_internal(duty, op);
        }
        self.expire_snapshot_sends();
        self.autopilot(since);
        self.place_jobs();
    }

    /// raft-rs pauses replication to a follower while a snapshot is in flight, until the follower
    /// acknowledges it or the driver reports the send as failed. A lost snapshot would stall that
    /// follower forever, so after a timeout the core reports the failure itself (the driver may
    /// report earlier with [`report_snapshot`](Self::report_snapshot)).
    fn expire_snapshot_sends(&mut self) {
        let timeout = self.cfg.tick_interval * (4 * self.cfg.election_ticks as u32);
        let now = self.now;
        let expired: Vec<NodeId> = self
            .snapshots_sent
            .iter()
            .filter(|&(_, &at)| now.saturating_sub(at) >= timeout)
            .map(|(&to, _)| to)
            .collect();
        for to in expired {
            self.snapshots_sent.remove(&to);
            let waiting = self.raw.raft.prs().get(to).is_some_and(|p| p.state == raft::ProgressState::Snapshot);
            if waiting {
                self.raw.report_snapshot(to, raft::SnapshotStatus::Failure);
            }
        }
    }

    /// Keeps the Raft configuration in step with the membership: learners for new members, the
    /// voter count at [`voter_target`], dead voters replaced — one single-step change at a time.
    fn autopilot(&mut self, since: Duration) {
        if self.raw.raft.has_pending_conf() {
            return;
        }
        let Some((kind, node)) = self.next_conf_change(since) else { return };
        if node == self.cfg.id && kind == ConfChangeType::RemoveNode {
            // Never remove ourselves while leading: hand leadership to a healthy voter first.
            if let Some(&to) = self.healthy_voters(since).iter().find(|&&v| v != self.cfg.id) {
                self.raw.transfer_leader(to);
            }
            return;
        }
        let mut single = ConfChangeSingle::default();
        single.set_change_type(kind);
        single.node_id = node;
        let mut cc = ConfChangeV2::default();
        cc.set_changes(vec![single].into());
        if self.raw.propose_conf_change(vec![], cc).is_ok() {
            self.duties.insert(Duty::ConfChange, self.now);
        }
    }

    fn healthy(&self, id: NodeId, since: Duration, window: Duration) -> bool {
        let alive = self.state.members.get(&id).is_some_and(|m| m.liveness == Liveness::Alive);
        let seen = self.last_seen.get(&id).copied().unwrap_or(since).max(since);
        alive && self.now.saturating_sub(seen) <= window
    }

    fn healthy_voters(&self, since: Duration) -> Vec<NodeId> {
        let cs = self.raw.raft.prs().conf().to_conf_state();
        let mut v: Vec<NodeId> =
            cs.voters.into_iter().filter(|&id| self.healthy(id, since, self.cfg.down_after)).collect();
        v.sort_unstable();
        v
    }

    fn next_conf_change(&self, since: Duration) -> Option<(ConfChangeType, NodeId)> {
        let raft = &self.raw.raft;
        let cs = raft.prs().conf().to_conf_state();
        let voters: BTreeSet<NodeId> = cs.voters.iter().copied().collect();
        let learners: BTreeSet<NodeId> = cs.learners.iter().copied().collect();
        let members = &self.state.members;
        // 1. Members not yet in the configuration join as learners.
        if let Some(&id) = members.keys().find(|id| !voters.contains(id) && !learners.contains(id)) {
            return Some((ConfChangeType::AddLearnerNode, id));
        }
        // 2. Nodes that left the membership leave the configuration.
        if let Some(&id) = voters.iter().chain(&learners).find(|id| !members.contains_key(id)) {
            return Some((ConfChangeType::RemoveNode, id));
        }
        let target = voter_target(members.len());
        let last_index = raft.raft_log.last_index();
        let caught_up = |id: NodeId| raft.prs().get(id).is_some_and(|p| p.matched + self.cfg.compact_lag >= last_index);
        let mut candidates: Vec<NodeId> = learners
            .iter()
            .copied()
            .filter(|&id| self.healthy(id, since, self.cfg.down_after) && caught_up(id))
            .collect();
        candidates.sort_by_key(|&id| (std::cmp::Reverse(raft.prs().get(id).map_or(0, |p| p.matched)), id));
        let dead: Vec<NodeId> = voters
            .iter()
            .copied()
            .filter(|&id| id != self.cfg.id && !self.healthy(id, since, self.cfg.voter_grace))
            .collect();
        // 3. A dead voter: first promote a replacement, then remove it.
        if let Some(&dead_voter) = dead.first() {
            if voters.len() <= target {
                if let Some(&learner) = candidates.first() {
                    return Some((ConfChangeType::AddNode, learner));
                }
                return None;
            }
            return Some((ConfChangeType::RemoveNode, dead_voter));
        }
        // 4. Too few voters: promote a healthy, caught-up learner.
        if voters.len() < target {
            return candidates.first().map(|&id| (ConfChangeType::AddNode, id));
        }
        // 5. Too many voters (members left): demote one, never ourselves.
        if voters.len() > target {
            return voters.iter().rev().find(|&&id| id != self.cfg.id).map(|&id| (ConfChangeType::AddLearnerNode, id));
        }
        None
    }

    /// Proposes placements for pending jobs and for running jobs that lost a node.
    fn place_jobs(&mut self) {
        let mut proposals = Vec::new();
        for job in self.state.jobs_needing_placement() {
            let duty = Duty::Place { job: job.id, epoch: job.epoch };
            if !self.duty_due(duty) {
                continue;
            }
            if let Ok(assignment) = scheduler::place_job(job, &self.state, &self.speeds) {
                proposals.push((duty, Op::Assign { job: job.id, expected_epoch: job.epoch, assignment }));
            }
        }
        for (duty, op) in proposals {
            self.propose_internal(duty, op);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::MemStore;

    fn member(id: NodeId) -> MemberInfo {
        MemberInfo {
            id,
            peer_addr: format!("n{id}:7400"),
            control_addr: format!("n{id}:7401"),
            cores: 2,
            memory_bytes: 1 << 30,
        }
    }

    fn logger() -> slog::Logger {
        slog::Logger::root(slog::Discard, slog::o!())
    }

    /// Drives one core alone until it has nothing to do.
    fn settle(core: &mut CoordinatorCore<MemStore>, store: &MemStore) -> Vec<Applied> {
        let mut applied = Vec::new();
        while let Some(fx) = core.ready() {
            store.persist(&fx.persist).unwrap();
            core.persisted(fx.ticket);
            applied.extend(fx.applied);
        }
        applied
    }

    #[test]
    fn single_node_bootstraps_elects_itself_and_applies_a_submit_once() {
        let store = MemStore::new();
        bootstrap(&store, &[member(1)]).unwrap();
        let mut core = CoordinatorCore::open(CoreConfig::new(1), store.clone(), &logger()).unwrap();
        let mut now = Duration::ZERO;
        while !core.is_leader() && now < Duration::from_secs(2) {
            now += Duration::from_millis(10);
            core.tick(now);
            settle(&mut core, &store);
        }
        assert!(core.is_leader());
        let submit = Command { request: RequestId { client: 4, seq: 1 }, op: Op::Join(member(2)) };
        core.propose(&submit).unwrap();
        core.propose(&submit).unwrap();
        let applied = settle(&mut core, &store);
        let mine: Vec<_> = applied.iter().filter(|a| a.command == submit).collect();
        assert_eq!(mine.len(), 2);
        assert!(!mine[0].duplicate && mine[1].duplicate);
        assert!(core.state().members.contains_key(&2));
    }

    #[test]
    fn follower_answers_not_leader_and_peers_cannot_inject_garbage() {
        let store = MemStore::new();
        let mut core = CoordinatorCore::open(CoreConfig::new(2), store, &logger()).unwrap();
        let cmd = Command { request: RequestId { client: 1, seq: 1 }, op: Op::Leave { node: 3 } };
        assert_eq!(core.propose(&cmd), Err(ProposeError::NotLeader { leader: None }));
        assert!(matches!(core.step(1, b"\xff\xff\xff"), Err(StepError::Malformed { .. })));
        let m = Message { from: 3, to: 2, ..Default::default() };
        let bytes = m.write_to_bytes().unwrap();
        assert!(matches!(core.step(1, &bytes), Err(StepError::WrongSender { .. })));
    }

    #[test]
    fn restart_restores_state_from_snapshot_and_log() {
        let store = MemStore::new();
        bootstrap(&store, &[member(1)]).unwrap();
        let mut cfg = CoreConfig::new(1);
        cfg.snapshot_every = 8;
        cfg.compact_lag = 2;
        let mut core = CoordinatorCore::open(cfg.clone(), store.clone(), &logger()).unwrap();
        let mut now = Duration::ZERO;
        while !core.is_leader() {
            now += Duration::from_millis(10);
            core.tick(now);
            settle(&mut core, &store);
        }
        for seq in 1..=20 {
            let cmd = Command {
                request: RequestId { client: 9, seq },
                op: Op::SetServingSlots { node: 1, slots: seq as u32 },
            };
            core.propose(&cmd).unwrap();
            settle(&mut core, &store);
        }
        let before = core.state().clone();
        assert!(store.first_index().unwrap() > 2, "log was compacted");
        drop(core);
        let mut again = CoordinatorCore::open(cfg, store.clone(), &logger()).unwrap();
        settle(&mut again, &store);
        assert_eq!(again.state(), &before);
    }
}
