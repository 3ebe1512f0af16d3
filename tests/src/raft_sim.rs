//! A deterministic simulated cluster of [`CoordinatorCore`]s: virtual time, in-memory links that
//! lose, delay, duplicate and partition messages, crashes and restarts, and clients that retry.
//! Everything random comes from one seed, so a failing seed replays exactly.
//!
//! The simulation checks Raft's safety invariants while it runs ([`SimCluster::violations`]):
//! - at most one leader per term;
//! - a committed entry is never changed: every replica that applies index `i` applies the same
//!   command (or configuration change) with the same term and outcome;
//! - each replica applies in strictly increasing index order (within one incarnation);
//! - no client request is applied (non-duplicate) more than once.
//!
//! [`SimCluster::check_converged`] adds the end-of-run checks: after healing, every replica holds the
//! same state, nothing committed was lost, and every acknowledged request was applied exactly once.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap};
use std::time::Duration;

use quiver_coordinator::state::{JobSpec, PartitionShape};
use quiver_coordinator::{
    Applied, ClusterState, Command, CoordinatorCore, CoreConfig, DetRng, Effects, LogStore, MemStore, MemberInfo,
    NodeId, Op, ProposeError, RequestId, bootstrap,
};

/// How the links misbehave.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NetFaults {
    /// Probability a message is lost.
    pub drop: f64,
    /// Probability a message is delivered twice.
    pub duplicate: f64,
    /// Shortest one-way delay.
    pub min_delay: Duration,
    /// Longest one-way delay (messages reorder within the window).
    pub max_delay: Duration,
}

impl NetFaults {
    /// A clean LAN: no loss, 0.2–1 ms.
    pub fn lan() -> Self {
        NetFaults {
            drop: 0.0,
            duplicate: 0.0,
            min_delay: Duration::from_micros(200),
            max_delay: Duration::from_millis(1),
        }
    }

    /// A bad network: 5% loss, 2% duplicates, 1–15 ms with reordering.
    pub fn lossy() -> Self {
        NetFaults {
            drop: 0.05,
            duplicate: 0.02,
            min_delay: Duration::from_millis(1),
            max_delay: Duration::from_millis(15),
        }
    }
}

/// The granularity of the simulation's clock for ticks, heartbeats and clients.
const STEP: Duration = Duration::from_millis(5);
/// How often node agents report liveness.
const HEARTBEAT_EVERY: Duration = Duration::from_millis(100);
/// A client retries a request it has not seen applied after this long.
const CLIENT_TIMEOUT: Duration = Duration::from_millis(400);

struct SimNode {
    id: NodeId,
    /// `None` while crashed.
    core: Option<CoordinatorCore<MemStore>>,
    /// The node's "disk": survives crashes.
    store: MemStore,
    /// Highest index applied in the current incarnation.
    applied_in_incarnation: u64,
}

#[derive(Debug, Clone)]
struct Pending {
    command: Command,
    /// The node the client is waiting on (`None`: find one).
    target: Option<NodeId>,
    sent_at: Duration,
}

#[derive(Debug)]
struct Client {
    id: u64,
    next_seq: u64,
    pending: Option<Pending>,
    /// Requests this client saw acknowledged.
    acked: Vec<RequestId>,
}

/// What the log holds at one committed index, as replicas applied it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Committed {
    Command { term: u64, command: Command, duplicate: bool },
    Conf { voters: Vec<NodeId>, learners: Vec<NodeId> },
}

struct Delivery {
    from: NodeId,
    to: NodeId,
    bytes: Vec<u8>,
}

/// Something scheduled at a virtual time.
enum Event {
    /// A message arrives.
    Deliver(Delivery),
    /// A node's clock ticks (each node on its own phase, like separate machines).
    Tick(NodeId),
    /// Agents' heartbeats and clients' requests.
    Step,
}

/// The simulated cluster.
pub struct SimCluster {
    now: Duration,
    rng: DetRng,
    faults: NetFaults,
    nodes: Vec<SimNode>,
    config: CoreConfig,
    queue: BinaryHeap<Reverse<(Duration, u64)>>,
    events: BTreeMap<u64, Event>,
    next_event: u64,
    cut: BTreeSet<(NodeId, NodeId)>,
    clients: Vec<Client>,
    next_heartbeat: Duration,
    leaders: BTreeMap<u64, NodeId>,
    committed: BTreeMap<u64, Committed>,
    applied_requests: BTreeMap<RequestId, u64>,
    violations: Vec<String>,
    joining: Vec<NodeId>,
    /// Whether clients keep issuing new requests.
    pub clients_active: bool,
}

impl std::fmt::Debug for SimCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimCluster").field("now", &self.now).field("nodes", &self.nodes.len()).finish_non_exhaustive()
    }
}

fn member(id: NodeId) -> MemberInfo {
    MemberInfo {
        id,
        peer_addr: format!("10.0.0.{id}:7400"),
        control_addr: format!("10.0.0.{id}:7401"),
        cores: 4,
        memory_bytes: 8 << 30,
    }
}

fn logger() -> slog::Logger {
    slog::Logger::root(slog::Discard, slog::o!())
}

impl SimCluster {
    /// `n` nodes bootstrapped together (`bootstrap-expect n`), `clients` retrying clients, links
    /// with `faults`, all randomness from `seed`. Uses [`CoreConfig::new`]'s real-time settings.
    pub fn new(n: usize, clients: usize, seed: u64, faults: NetFaults) -> Self {
        Self::with_config(n, clients, seed, faults, CoreConfig::new(0))
    }

    /// Like [`new`](Self::new) with a template config (its `id` and `seed` are replaced per node).
    pub fn with_config(n: usize, clients: usize, seed: u64, faults: NetFaults, config: CoreConfig) -> Self {
        let members: Vec<MemberInfo> = (1..=n as NodeId).map(member).collect();
        let mut sim = SimCluster {
            now: Duration::ZERO,
            rng: DetRng::new(seed),
            faults,
            nodes: Vec::new(),
            config,
            queue: BinaryHeap::new(),
            events: BTreeMap::new(),
            next_event: 0,
            cut: BTreeSet::new(),
            clients: (1..=clients as u64).map(|id| Client { id, next_seq: 1, pending: None, acked: vec![] }).collect(),
            next_heartbeat: Duration::ZERO,
            leaders: BTreeMap::new(),
            committed: BTreeMap::new(),
            applied_requests: BTreeMap::new(),
            violations: Vec::new(),
            joining: Vec::new(),
            clients_active: true,
        };
        for m in &members {
            let store = MemStore::new();
            // A fresh MemStore always accepts the bootstrap snapshot.
            bootstrap(&store, &members).expect("bootstrap a fresh in-memory store");
            sim.nodes.push(SimNode { id: m.id, core: None, store, applied_in_incarnation: 0 });
        }
        for id in 1..=n as NodeId {
            sim.restart(id);
            let interval = sim.config.tick_interval.as_micros() as u64;
            let phase = Duration::from_micros(sim.rng.below(interval.max(1)));
            sim.schedule(phase, Event::Tick(id));
        }
        sim.schedule(STEP, Event::Step);
        sim
    }

    fn schedule(&mut self, at: Duration, event: Event) {
        let seq = self.next_event;
        self.next_event += 1;
        self.queue.push(Reverse((at, seq)));
        self.events.insert(seq, event);
    }

    fn node_config(&self, id: NodeId) -> CoreConfig {
        let mut cfg = self.config.clone();
        cfg.id = id;
        cfg.seed = self.rng.clone().next_u64() ^ id.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        cfg
    }

    // ---- observation ----

    /// Virtual time.
    pub fn now(&self) -> Duration {
        self.now
    }

    /// Ids of all nodes.
    pub fn ids(&self) -> Vec<NodeId> {
        self.nodes.iter().map(|n| n.id).collect()
    }

    /// The live leader with the highest term, if any.
    pub fn leader(&self) -> Option<NodeId> {
        self.nodes
            .iter()
            .filter_map(|n| n.core.as_ref().filter(|c| c.is_leader()).map(|c| (c.term(), n.id)))
            .max()
            .map(|(_, id)| id)
    }

    /// The term of a live node.
    pub fn term_of(&self, id: NodeId) -> Option<u64> {
        self.node(id).core.as_ref().map(|c| c.term())
    }

    /// The state machine of a live node.
    pub fn state_of(&self, id: NodeId) -> Option<&ClusterState> {
        self.node(id).core.as_ref().map(|c| c.state())
    }

    /// A live node's core.
    pub fn core(&self, id: NodeId) -> Option<&CoordinatorCore<MemStore>> {
        self.node(id).core.as_ref()
    }

    /// Invariant violations seen so far.
    pub fn violations(&self) -> &[String] {
        &self.violations
    }

    /// Requests acknowledged to clients so far.
    pub fn acknowledged(&self) -> usize {
        self.clients.iter().map(|c| c.acked.len()).sum()
    }

    /// Requests still waiting for an acknowledgement.
    pub fn unacknowledged(&self) -> usize {
        self.clients.iter().filter(|c| c.pending.is_some()).count()
    }

    /// Number of committed indices observed.
    pub fn committed_len(&self) -> usize {
        self.committed.len()
    }

    fn node(&self, id: NodeId) -> &SimNode {
        &self.nodes[(id - 1) as usize]
    }

    fn node_mut(&mut self, id: NodeId) -> &mut SimNode {
        &mut self.nodes[(id - 1) as usize]
    }

    // ---- faults ----

    /// Kills a node: its core is dropped, its store (disk) survives.
    pub fn crash(&mut self, id: NodeId) {
        self.node_mut(id).core = None;
    }

    /// Starts a crashed node again from its store.
    pub fn restart(&mut self, id: NodeId) {
        if self.node(id).core.is_some() {
            return;
        }
        let cfg = self.node_config(id);
        let store = self.node(id).store.clone();
        let core = CoordinatorCore::open(cfg, store, &logger()).expect("reopen a simulated node from its store");
        let node = self.node_mut(id);
        node.core = Some(core);
        node.applied_in_incarnation = 0;
        let now = self.now;
        if let Some(core) = self.node_mut(id).core.as_mut() {
            core.tick(now);
        }
        self.drive(id);
    }

    /// Starts a brand-new node with an empty log and asks the cluster to let it join, through a
    /// random member that forwards to the leader (as `quiver agent --join SEED` does). Returns the
    /// new id; the join is retried by [`retry_joins`](Self::retry_joins) until applied.
    pub fn add_node(&mut self) -> NodeId {
        let id = self.nodes.len() as NodeId + 1;
        self.nodes.push(SimNode { id, core: None, store: MemStore::new(), applied_in_incarnation: 0 });
        self.restart(id);
        let interval = self.config.tick_interval.as_micros() as u64;
        let phase = Duration::from_micros(self.rng.below(interval.max(1)));
        self.schedule(self.now + phase, Event::Tick(id));
        self.joining.push(id);
        self.retry_joins();
        id
    }

    /// Proposes `Join` for every node that is not a member yet.
    pub fn retry_joins(&mut self) {
        let joining = std::mem::take(&mut self.joining);
        for id in joining {
            let member_everywhere =
                self.leader().and_then(|l| self.state_of(l)).is_some_and(|s| s.members.contains_key(&id));
            if member_everywhere {
                continue;
            }
            self.joining.push(id);
            let command = Command { request: RequestId { client: 1000 + id, seq: 1 }, op: Op::Join(member(id)) };
            let mut target = self.rng.below(id - 1) + 1;
            for _ in 0..self.nodes.len() {
                let Some(core) = self.node_mut(target).core.as_mut() else { break };
                match core.propose(&command) {
                    Ok(()) => {
                        self.drive(target);
                        break;
                    }
                    Err(ProposeError::NotLeader { leader: Some(hint) }) if hint.id != target => target = hint.id,
                    Err(_) => break,
                }
            }
        }
    }

    /// Whether a node is running.
    pub fn is_up(&self, id: NodeId) -> bool {
        self.node(id).core.is_some()
    }

    /// Cuts every link between the two groups, both directions.
    pub fn partition(&mut self, a: &[NodeId], b: &[NodeId]) {
        for &x in a {
            for &y in b {
                self.cut.insert((x, y));
                self.cut.insert((y, x));
            }
        }
    }

    /// Cuts a node off from everyone.
    pub fn isolate(&mut self, id: NodeId) {
        let others: Vec<NodeId> = self.ids().into_iter().filter(|&x| x != id).collect();
        self.partition(&[id], &others);
    }

    /// Restores every link.
    pub fn heal(&mut self) {
        self.cut.clear();
    }

    /// A random number from the simulation's generator (for scenario scripts).
    pub fn random(&mut self, n: u64) -> u64 {
        self.rng.below(n)
    }

    // ---- running ----

    /// Runs until `deadline` (virtual).
    pub fn run_until_time(&mut self, deadline: Duration) {
        self.run_until(deadline, |_| false);
    }

    /// Runs for `d` (virtual).
    pub fn run_for(&mut self, d: Duration) {
        let deadline = self.now + d;
        self.run_until_time(deadline);
    }

    /// Runs until `done` holds (checked after every event) or `deadline`; returns whether it held.
    pub fn run_until(&mut self, deadline: Duration, mut done: impl FnMut(&Self) -> bool) -> bool {
        loop {
            if done(self) {
                return true;
            }
            let Some(&Reverse((at, seq))) = self.queue.peek() else { return false };
            if at > deadline {
                self.now = self.now.max(deadline);
                return done(self);
            }
            self.queue.pop();
            self.now = at;
            match self.events.remove(&seq) {
                Some(Event::Deliver(d)) => self.deliver(d),
                Some(Event::Tick(id)) => {
                    if let Some(core) = self.node_mut(id).core.as_mut() {
                        core.tick(at);
                    }
                    self.drive(id);
                    self.schedule(at + self.config.tick_interval, Event::Tick(id));
                }
                Some(Event::Step) => {
                    self.step_agents_and_clients();
                    self.schedule(at + STEP, Event::Step);
                }
                None => {}
            }
        }
    }

    fn deliver(&mut self, d: Delivery) {
        if self.cut.contains(&(d.from, d.to)) {
            return;
        }
        let Some(core) = self.node_mut(d.to).core.as_mut() else { return };
        // Refusals (e.g. a response from a node no longer in the configuration) are normal here.
        let _ = core.step(d.from, &d.bytes);
        self.drive(d.to);
    }

    fn step_agents_and_clients(&mut self) {
        let now = self.now;
        if now >= self.next_heartbeat {
            self.next_heartbeat = now + HEARTBEAT_EVERY;
            let ids = self.ids();
            for &id in &ids {
                if self.node(id).core.is_none() {
                    continue;
                }
                // The agent on `id` reports to every coordinator it can reach.
                for &to in &ids {
                    if !self.cut.contains(&(id, to))
                        && let Some(core) = self.node_mut(to).core.as_mut()
                    {
                        core.heartbeat(id, now);
                    }
                }
            }
        }
        self.step_clients();
        if !self.joining.is_empty() && now.as_millis() % 500 < STEP.as_millis() {
            self.retry_joins();
        }
    }

    fn send(&mut self, from: NodeId, msgs: Vec<quiver_coordinator::Outbound>) {
        for m in msgs {
            if self.cut.contains(&(from, m.to)) || self.rng.unit() < self.faults.drop {
                continue;
            }
            let copies = if self.rng.unit() < self.faults.duplicate { 2 } else { 1 };
            for _ in 0..copies {
                let span = self.faults.max_delay.saturating_sub(self.faults.min_delay).as_micros() as u64;
                let delay = self.faults.min_delay + Duration::from_micros(self.rng.below(span + 1));
                let delivery = Delivery { from, to: m.to, bytes: m.bytes.clone() };
                self.schedule(self.now + delay, Event::Deliver(delivery));
            }
        }
    }

    /// Carries out a node's effects in the documented order until it has none.
    fn drive(&mut self, id: NodeId) {
        loop {
            let Some(core) = self.node_mut(id).core.as_mut() else { return };
            let Some(fx) = core.ready() else { break };
            let Effects { ticket, messages, persist, messages_after_persist, applied, conf_changes, .. } = fx;
            // One turn may apply commands and configuration changes interleaved; record in log order.
            let mut entries: Vec<(u64, Committed, Option<Applied>)> = applied
                .into_iter()
                .map(|a| {
                    let c = Committed::Command { term: a.term, command: a.command.clone(), duplicate: a.duplicate };
                    (a.index, c, Some(a))
                })
                .chain(
                    conf_changes
                        .into_iter()
                        .map(|c| (c.index, Committed::Conf { voters: c.voters, learners: c.learners }, None)),
                )
                .collect();
            entries.sort_by_key(|e| e.0);
            self.send(id, messages);
            if let Err(e) = self.node(id).store.persist(&persist) {
                self.violations.push(format!("node {id}: persist failed: {e}"));
                self.crash(id);
                return;
            }
            self.send(id, messages_after_persist);
            if let Some(core) = self.node_mut(id).core.as_mut() {
                core.persisted(ticket);
            }
            for (index, entry, applied) in entries {
                match applied {
                    Some(a) => self.record_applied(id, a),
                    None => self.record_committed(id, index, entry),
                }
            }
        }
        self.check_leader(id);
    }

    fn check_leader(&mut self, id: NodeId) {
        let Some(core) = self.node(id).core.as_ref() else { return };
        if core.is_leader() {
            let term = core.term();
            match self.leaders.get(&term) {
                Some(&other) if other != id => {
                    self.violations.push(format!("term {term}: two leaders, {other} and {id}"));
                }
                _ => {
                    self.leaders.insert(term, id);
                }
            }
        }
    }

    fn record_committed(&mut self, id: NodeId, index: u64, entry: Committed) {
        let previous = std::mem::replace(&mut self.node_mut(id).applied_in_incarnation, index);
        if index <= previous {
            self.violations.push(format!("node {id}: applied index {index} after {previous}: {entry:?}"));
        }
        match self.committed.get(&index) {
            Some(existing) if *existing != entry => {
                self.violations
                    .push(format!("index {index}: node {id} applied {entry:?}, another replica applied {existing:?}"));
            }
            Some(_) => {}
            None => {
                self.committed.insert(index, entry);
            }
        }
    }

    fn record_applied(&mut self, id: NodeId, a: Applied) {
        let Applied { index, term, command, duplicate, .. } = a;
        let request = command.request;
        let first_time = !self.committed.contains_key(&index);
        self.record_committed(id, index, Committed::Command { term, command, duplicate });
        if first_time && !duplicate && request.client != 0 {
            let count = self.applied_requests.entry(request).or_insert(0);
            *count += 1;
            if *count > 1 {
                self.violations.push(format!("request {request:?} applied {count} times"));
            }
        }
        // The client waiting on this node for this request gets its answer.
        for c in &mut self.clients {
            if let Some(p) = &c.pending
                && p.command.request == request
                && p.target == Some(id)
            {
                c.acked.push(request);
                c.pending = None;
            }
        }
    }

    fn step_clients(&mut self) {
        for i in 0..self.clients.len() {
            let now = self.now;
            let client = &mut self.clients[i];
            let resend = match &client.pending {
                Some(p) => p.target.is_none() || now.saturating_sub(p.sent_at) >= CLIENT_TIMEOUT,
                None if self.clients_active => {
                    let seq = client.next_seq;
                    client.next_seq += 1;
                    let op = if seq.is_multiple_of(3) {
                        Op::SetServingSlots { node: 1 + seq % 3, slots: seq as u32 }
                    } else {
                        let spec = JobSpec {
                            name: format!("job-{}-{seq}", client.id),
                            kernel: "pagerank".into(),
                            params: vec![],
                            iterations: 10,
                            feature_width: 1,
                            partitions: vec![PartitionShape { vertices: 1000, edges: 16_000 }; 4],
                            holders: vec![],
                        };
                        Op::Submit { spec, graph_digest: [seq as u8; 32] }
                    };
                    let command = Command { request: RequestId { client: client.id, seq }, op };
                    client.pending = Some(Pending { command, target: None, sent_at: now });
                    true
                }
                None => false,
            };
            if resend {
                self.send_request(i);
            }
        }
    }

    fn send_request(&mut self, i: usize) {
        let Some(p) = self.clients[i].pending.clone() else { return };
        // Clients start from a random node and follow "not leader" hints, like the CLI does.
        let mut target = self.rng.below(self.nodes.len() as u64) + 1;
        for _ in 0..self.nodes.len() {
            let Some(core) = self.node_mut(target).core.as_mut() else { break };
            match core.propose(&p.command) {
                Ok(()) => {
                    self.clients[i].pending = Some(Pending { target: Some(target), sent_at: self.now, ..p });
                    self.drive(target);
                    return;
                }
                Err(ProposeError::NotLeader { leader: Some(hint) }) if hint.id != target => target = hint.id,
                Err(_) => break,
            }
        }
        self.clients[i].pending = Some(Pending { target: None, sent_at: self.now, ..p });
    }

    // ---- end-of-run checks ----

    /// After [`heal`](Self::heal) and restarting everyone: runs until all replicas agree and all
    /// pending requests are acknowledged (or `within` passes), then checks convergence.
    pub fn settle_and_check(&mut self, within: Duration) -> Result<(), String> {
        self.clients_active = false;
        let deadline = self.now + within;
        let converged = self.run_until(deadline, |s| s.unacknowledged() == 0 && s.replicas_agree());
        if !converged {
            return Err(format!(
                "no convergence within {within:?}: leader {:?}, {} requests unacknowledged, applied {:?}",
                self.leader(),
                self.unacknowledged(),
                self.nodes.iter().map(|n| n.core.as_ref().map(|c| c.status().applied)).collect::<Vec<_>>()
            ));
        }
        self.check_converged()
    }

    fn replicas_agree(&self) -> bool {
        let mut states = self.nodes.iter().filter_map(|n| n.core.as_ref());
        let Some(first) = states.next() else { return false };
        let last = self.committed.keys().next_back().copied().unwrap_or(0);
        first.state().applied_index >= last && states.all(|c| c.state() == first.state())
    }

    /// Checks the end-of-run invariants (see the module docs).
    pub fn check_converged(&self) -> Result<(), String> {
        if let Some(v) = self.violations.first() {
            return Err(format!("{} invariant violations, first: {v}", self.violations.len()));
        }
        for c in &self.clients {
            for r in &c.acked {
                match self.applied_requests.get(r) {
                    Some(1) => {}
                    other => return Err(format!("acknowledged request {r:?} applied {other:?} times")),
                }
            }
        }
        let Some(reference) = self.nodes.iter().find_map(|n| n.core.as_ref()) else {
            return Err("no live node".into());
        };
        for n in &self.nodes {
            if let Some(core) = &n.core
                && core.state() != reference.state()
            {
                return Err(format!("node {} state differs from node {}", n.id, reference.id()));
            }
        }
        Ok(())
    }

    /// The applied history as a comparable fingerprint (for determinism checks).
    pub fn history(&self) -> Vec<String> {
        self.committed.iter().map(|(i, c)| format!("{i}:{c:?}")).collect()
    }
}

/// One failover measurement: a 3-node cluster on a clean LAN elects a leader, runs for a second
/// with client load, then the leader crashes; returns the virtual time until a new leader is
/// elected (or `None` if none within 5 s).
pub fn failover_time(seed: u64) -> Option<Duration> {
    let mut sim = SimCluster::new(3, 1, seed, NetFaults::lan());
    if !sim.run_until(Duration::from_secs(3), |s| s.leader().is_some()) {
        return None;
    }
    // A random moment within the next second, so the crash lands anywhere in the heartbeat cycle.
    let settle = Duration::from_millis(500 + sim.random(1000));
    sim.run_for(settle);
    let old = sim.leader()?;
    let old_term = sim.term_of(old)?;
    sim.crash(old);
    let crashed_at = sim.now();
    let elected = sim.run_until(crashed_at + Duration::from_secs(5), |s| {
        s.leader().is_some_and(|l| l != old && s.term_of(l).is_some_and(|t| t > old_term))
    });
    elected.then(|| sim.now() - crashed_at)
}
