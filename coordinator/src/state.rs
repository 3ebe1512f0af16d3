//! The replicated cluster state machine: members, jobs and serving capacity.
//!
//! This module owns the data every coordinator replica agrees on and the one function that changes
//! it, [`ClusterState::apply`]. Applying is deterministic: the outcome depends only on the state and
//! the command (and the log index it was committed at), never on clocks, maps with random order or
//! the replica applying it. It must not know about Raft, storage or the network; the core feeds it
//! committed commands in log order.
//!
//! Idempotency: every [`Command`] carries a [`RequestId`] (client id + sequence number). The state
//! remembers the outcome of each client's recent requests, so a retry of a request that was in fact
//! committed is not applied again and gets the original [`Outcome`] back (Raft dissertation §6.3).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// A node's id: the Raft peer id, never 0.
pub type NodeId = u64;

/// A job's id: the log index of the entry that submitted it, so unique and identical on every replica.
pub type JobId = u64;

/// A partition's index within its job.
pub type PartitionId = u32;

/// A content digest (BLAKE3/SHA-256 sized) naming a graph or a result.
pub type Digest = [u8; 32];

/// How many outcomes per client are remembered for deduplicating retries.
pub const DEDUP_WINDOW: u64 = 128;

/// The client id reserved for commands the leader issues itself (autopilot, rescheduling).
/// These are never deduplicated: the leader does not retry them, it re-derives them from the state.
pub const INTERNAL_CLIENT: u64 = 0;

/// Identifies one client request across retries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct RequestId {
    /// The client (a CLI session, an agent, the gRPC front end); 0 is [`INTERNAL_CLIENT`].
    pub client: u64,
    /// Increases by one per new request of that client; a retry reuses it.
    pub seq: u64,
}

impl RequestId {
    /// An id for a command the leader issues itself.
    pub const fn internal() -> Self {
        RequestId { client: INTERNAL_CLIENT, seq: 0 }
    }
}

/// What a node tells the cluster about itself when it joins.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberInfo {
    /// Raft peer id, unique in the cluster, never 0.
    pub id: NodeId,
    /// QUIC peer address (`host:port`).
    pub peer_addr: String,
    /// gRPC control-plane address (`host:port`).
    pub control_addr: String,
    /// Worker cores available for kernels.
    pub cores: u32,
    /// Memory available for partitions, in bytes.
    pub memory_bytes: u64,
}

/// A member's Raft role as the state machine records it (kept in step with the Raft configuration
/// by the autopilot).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Role {
    /// Votes and can lead.
    Voter,
    /// Receives the log but does not vote.
    Learner,
}

/// Whether the cluster considers a member reachable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Liveness {
    /// Heartbeats arrive in time.
    Alive,
    /// Missed its heartbeat deadline; its work is moved elsewhere.
    Down,
}

/// One member of the cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// What the node reported when it joined.
    pub info: MemberInfo,
    /// Voter or learner.
    pub role: Role,
    /// Alive or down.
    pub liveness: Liveness,
    /// Serving-path slots this node offers (concurrent small diffusions).
    pub serving_slots: u32,
}

/// What a job computes; opaque to the coordinator except for the cost-model inputs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobSpec {
    /// A human name.
    pub name: String,
    /// The kernel (`pagerank`, `ppr`, `heat`, `appnp`) and its parameters, as the agent encodes them.
    pub kernel: String,
    /// Opaque kernel parameters.
    pub params: Vec<u8>,
    /// Iterations (or the cap when running to a tolerance).
    pub iterations: u32,
    /// Width of the feature vectors (1 for scalar diffusions).
    pub feature_width: u32,
    /// The partitions and their sizes, for the cost model.
    pub partitions: Vec<PartitionShape>,
    /// The nodes holding the job's input graph and its checkpoints, the submitting node first.
    /// The job's master is one of them; its data is lost only when every one has left.
    pub holders: Vec<NodeId>,
}

/// Size of one partition, as the partitioner reported it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionShape {
    /// Vertices owned by the partition.
    pub vertices: u64,
    /// In-edges of the owned vertices.
    pub edges: u64,
}

/// A job's lifecycle.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum JobState {
    /// Recorded, waiting for an assignment.
    Pending,
    /// Assigned and running.
    Running,
    /// Finished; the result digest is recorded.
    Completed,
    /// Gave up, with the reason.
    Failed(String),
    /// Cancelled by a client.
    Cancelled,
}

impl JobState {
    /// Whether the job can still change.
    pub fn is_terminal(&self) -> bool {
        matches!(self, JobState::Completed | JobState::Failed(_) | JobState::Cancelled)
    }
}

/// The last checkpoint a job recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// Epoch the checkpoint was taken in.
    pub epoch: u64,
    /// Superstep after which the state was saved.
    pub superstep: u64,
}

/// One job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Job {
    /// Its id (the submit entry's log index).
    pub id: JobId,
    /// What it computes.
    pub spec: JobSpec,
    /// The input graph.
    pub graph_digest: Digest,
    /// Lifecycle.
    pub state: JobState,
    /// Bumped by every assignment; work from an older epoch is refused.
    pub epoch: u64,
    /// Partition → owner.
    pub assignment: BTreeMap<PartitionId, NodeId>,
    /// Last recorded checkpoint.
    pub last_checkpoint: Option<Checkpoint>,
    /// Result digest once completed.
    pub result_digest: Option<Digest>,
    /// The holder that masters the job (and keeps its result): the first holder at submit;
    /// an assignment made while it is down hands the job to the first alive holder.
    pub master: NodeId,
}

impl Job {
    /// The holder an assignment now would hand the job to: the master while it is alive,
    /// else the first alive holder; `None` when no holder is alive.
    pub fn next_master(&self, members: &BTreeMap<NodeId, Member>) -> Option<NodeId> {
        let alive = |n: &NodeId| members.get(n).is_some_and(|m| m.liveness == Liveness::Alive);
        if alive(&self.master) {
            return Some(self.master);
        }
        self.spec.holders.iter().copied().find(alive)
    }

    /// Whether every node that held the job's data has left the cluster.
    pub fn data_lost(&self, members: &BTreeMap<NodeId, Member>) -> bool {
        !self.spec.holders.is_empty() && self.spec.holders.iter().all(|h| !members.contains_key(h))
    }
}

/// A change to the cluster state; the payload of every normal Raft entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Command {
    /// The client's request id, reused on retry.
    pub request: RequestId,
    /// What to do.
    pub op: Op,
}

/// The operations.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    /// A node joins (or re-announces itself with new addresses); it starts as a learner.
    Join(MemberInfo),
    /// A node leaves the cluster for good.
    Leave { node: NodeId },
    /// A node missed its heartbeat deadline.
    MarkDown { node: NodeId },
    /// A down node is heard from again.
    MarkUp { node: NodeId },
    /// A node's serving capacity changed.
    SetServingSlots { node: NodeId, slots: u32 },
    /// Record a new job.
    Submit { spec: JobSpec, graph_digest: Digest },
    /// Commit a (re)assignment; bumps the job's epoch. `expected_epoch` fences concurrent schedulers.
    Assign { job: JobId, expected_epoch: u64, assignment: BTreeMap<PartitionId, NodeId> },
    /// A job recorded a checkpoint.
    Checkpoint { job: JobId, epoch: u64, superstep: u64 },
    /// A job finished.
    Complete { job: JobId, epoch: u64, result_digest: Digest },
    /// A job failed.
    Fail { job: JobId, epoch: u64, reason: String },
    /// A client cancelled a job.
    Cancel { job: JobId },
    /// Records a token (join or API). `now_unix` (the proposer's clock) prunes expired tokens.
    AddToken { id: String, token: Token, now_unix: u64 },
    /// Spends one use of a join token: refused when unknown, of another purpose, wrong secret,
    /// expired at `now_unix` (the proposer's clock), or used up; a replayed token is refused.
    UseToken { id: String, secret_hash: Digest, purpose: TokenPurpose, now_unix: u64 },
    /// `node` now holds a copy of the job's graph (and features): it may master the job when
    /// the holders before it are down. Idempotent; refused for a node that is not a member.
    AddHolder { job: JobId, node: NodeId },
}

/// What a token lets its holder do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum TokenPurpose {
    /// Join the cluster once and receive a node certificate.
    Join,
    /// Call the gRPC API (as `authorization: Bearer …`) until it expires.
    Api,
}

/// A token the cluster knows: only the SHA-256 of its secret is replicated.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Token {
    pub purpose: TokenPurpose,
    pub secret_hash: Digest,
    /// Unix seconds after which the token is refused.
    pub expires_unix: u64,
    /// Uses left; `None` for unlimited (API tokens).
    pub uses_left: Option<u32>,
}

/// Why a token was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum TokenRefusal {
    Unknown,
    WrongSecret,
    WrongPurpose,
    Expired,
    AlreadyUsed,
}

impl std::fmt::Display for TokenRefusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TokenRefusal::Unknown => "unknown to the cluster",
            TokenRefusal::WrongSecret => "the secret does not match",
            TokenRefusal::WrongPurpose => "it is not meant for this use",
            TokenRefusal::Expired => "it has expired",
            TokenRefusal::AlreadyUsed => "it was already used (join tokens are single-use)",
        })
    }
}

/// The result of applying a command, returned to the client that proposed it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    /// The command took effect.
    Done,
    /// A job was recorded with this id.
    Submitted { job: JobId },
    /// A job was (re)assigned and now runs in this epoch.
    Assigned { job: JobId, epoch: u64 },
    /// The command was refused; the state did not change.
    Rejected(Rejection),
}

/// Why a command was refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum Rejection {
    /// No member with that id.
    #[error("node {0} is not a member")]
    UnknownNode(NodeId),
    /// Node id 0 is reserved.
    #[error("node id 0 is reserved")]
    ReservedNodeId,
    /// No job with that id.
    #[error("job {0} does not exist")]
    UnknownJob(JobId),
    /// The job already finished.
    #[error("job {0} already finished")]
    JobFinished(JobId),
    /// Work from an older epoch.
    #[error("job {job}: epoch {got} is stale, current epoch is {current}")]
    StaleEpoch { job: JobId, got: u64, current: u64 },
    /// An assignment names a partition the job does not have or misses one.
    #[error("job {job}: assignment must place each of its {partitions} partitions exactly once")]
    BadAssignment { job: JobId, partitions: u32 },
    /// An assignment places a partition on a node that is not an alive member.
    #[error("job {job}: partition {partition} assigned to node {node}, which is not an alive member")]
    AssignedToUnavailable { job: JobId, partition: PartitionId, node: NodeId },
    /// The retry is older than the deduplication window, so its outcome is forgotten.
    #[error("request {seq} of client {client} is older than the deduplication window")]
    StaleRequest { client: u64, seq: u64 },
    /// A token was refused.
    #[error("token {id} refused: {reason}")]
    Token { id: String, reason: TokenRefusal },
    /// A token id is taken.
    #[error("token {0} already exists")]
    TokenExists(String),
}

/// The replicated state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterState {
    /// Members by id.
    pub members: BTreeMap<NodeId, Member>,
    /// Jobs by id.
    pub jobs: BTreeMap<JobId, Job>,
    /// Remembered outcomes per client, for idempotent retries.
    sessions: BTreeMap<u64, Session>,
    /// Log index of the last applied entry.
    pub applied_index: u64,
    /// Join and API tokens by id (secrets only as hashes).
    pub tokens: BTreeMap<String, Token>,
}

/// The outcomes of one client's recent requests.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Session {
    /// Highest sequence number applied.
    highest: u64,
    /// Outcomes of the requests in `(highest - DEDUP_WINDOW, highest]`.
    outcomes: BTreeMap<u64, Outcome>,
}

/// The result of [`ClusterState::apply`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApplyResult {
    /// The outcome (the original one for a duplicate).
    pub outcome: Outcome,
    /// True when the request had already been applied and this was a retry.
    pub duplicate: bool,
}

impl ClusterState {
    /// A state with these initial members (bootstrap); the first `voters` ids are voters.
    pub fn bootstrap(members: &[MemberInfo], voters: &[NodeId]) -> Self {
        let mut state = ClusterState::default();
        for info in members {
            let role = if voters.contains(&info.id) { Role::Voter } else { Role::Learner };
            state.members.insert(
                info.id,
                Member { info: info.clone(), role, liveness: Liveness::Alive, serving_slots: info.cores },
            );
        }
        state
    }

    /// Records the Raft roles after a configuration change applied at `index`: members in
    /// `voters` are voters, every other member a learner.
    pub fn set_roles(&mut self, index: u64, voters: &[NodeId]) {
        self.applied_index = self.applied_index.max(index);
        for (id, m) in &mut self.members {
            m.role = if voters.contains(id) { Role::Voter } else { Role::Learner };
        }
    }

    /// Records that the entry at `index` (an empty or undecodable one) was applied.
    pub fn skip(&mut self, index: u64) {
        self.applied_index = self.applied_index.max(index);
    }

    /// Total serving slots of alive members.
    pub fn serving_capacity(&self) -> u64 {
        self.members.values().filter(|m| m.liveness == Liveness::Alive).map(|m| u64::from(m.serving_slots)).sum()
    }

    /// The alive members.
    pub fn alive_members(&self) -> impl Iterator<Item = &Member> {
        self.members.values().filter(|m| m.liveness == Liveness::Alive)
    }

    /// Applies a committed command at log `index`. Deterministic; never panics.
    pub fn apply(&mut self, index: u64, cmd: &Command) -> ApplyResult {
        self.applied_index = self.applied_index.max(index);
        let RequestId { client, seq } = cmd.request;
        if client != INTERNAL_CLIENT
            && let Some(session) = self.sessions.get(&client)
        {
            if let Some(outcome) = session.outcomes.get(&seq) {
                return ApplyResult { outcome: outcome.clone(), duplicate: true };
            }
            if seq + DEDUP_WINDOW <= session.highest {
                let outcome = Outcome::Rejected(Rejection::StaleRequest { client, seq });
                return ApplyResult { outcome, duplicate: true };
            }
        }
        let outcome = self.apply_op(index, &cmd.op);
        if client != INTERNAL_CLIENT {
            let session = self.sessions.entry(client).or_default();
            session.highest = session.highest.max(seq);
            session.outcomes.insert(seq, outcome.clone());
            let floor = session.highest.saturating_sub(DEDUP_WINDOW);
            while let Some((&oldest, _)) = session.outcomes.first_key_value() {
                if oldest > floor {
                    break;
                }
                session.outcomes.remove(&oldest);
            }
        }
        ApplyResult { outcome, duplicate: false }
    }

    fn apply_op(&mut self, index: u64, op: &Op) -> Outcome {
        match self.try_apply_op(index, op) {
            Ok(outcome) => outcome,
            Err(rejection) => Outcome::Rejected(rejection),
        }
    }

    fn member_mut(&mut self, node: NodeId) -> Result<&mut Member, Rejection> {
        self.members.get_mut(&node).ok_or(Rejection::UnknownNode(node))
    }

    fn live_job_mut(&mut self, job: JobId) -> Result<&mut Job, Rejection> {
        let j = self.jobs.get_mut(&job).ok_or(Rejection::UnknownJob(job))?;
        if j.state.is_terminal() {
            return Err(Rejection::JobFinished(job));
        }
        Ok(j)
    }

    fn try_apply_op(&mut self, index: u64, op: &Op) -> Result<Outcome, Rejection> {
        match op {
            Op::Join(info) => {
                if info.id == 0 {
                    return Err(Rejection::ReservedNodeId);
                }
                match self.members.get_mut(&info.id) {
                    // A re-join (restart with new addresses) keeps role; it proves liveness.
                    Some(m) => {
                        m.info = info.clone();
                        m.liveness = Liveness::Alive;
                    }
                    None => {
                        let member = Member {
                            info: info.clone(),
                            role: Role::Learner,
                            liveness: Liveness::Alive,
                            serving_slots: info.cores,
                        };
                        self.members.insert(info.id, member);
                    }
                }
                Ok(Outcome::Done)
            }
            Op::Leave { node } => {
                self.members.remove(node).ok_or(Rejection::UnknownNode(*node))?;
                self.orphan_assignments(*node);
                Ok(Outcome::Done)
            }
            Op::MarkDown { node } => {
                self.member_mut(*node)?.liveness = Liveness::Down;
                Ok(Outcome::Done)
            }
            Op::MarkUp { node } => {
                self.member_mut(*node)?.liveness = Liveness::Alive;
                Ok(Outcome::Done)
            }
            Op::SetServingSlots { node, slots } => {
                self.member_mut(*node)?.serving_slots = *slots;
                Ok(Outcome::Done)
            }
            Op::Submit { spec, graph_digest } => {
                let job = Job {
                    id: index,
                    spec: spec.clone(),
                    graph_digest: *graph_digest,
                    state: JobState::Pending,
                    epoch: 0,
                    assignment: BTreeMap::new(),
                    last_checkpoint: None,
                    result_digest: None,
                    master: spec.holders.first().copied().unwrap_or(0),
                };
                self.jobs.insert(index, job);
                Ok(Outcome::Submitted { job: index })
            }
            Op::Assign { job, expected_epoch, assignment } => {
                let members = &self.members;
                let j = self.jobs.get_mut(job).ok_or(Rejection::UnknownJob(*job))?;
                if j.state.is_terminal() {
                    return Err(Rejection::JobFinished(*job));
                }
                if *expected_epoch != j.epoch {
                    return Err(Rejection::StaleEpoch { job: *job, got: *expected_epoch, current: j.epoch });
                }
                let partitions = j.spec.partitions.len() as u32;
                let complete = assignment.len() == partitions as usize
                    && assignment.keys().enumerate().all(|(i, &p)| i as u32 == p);
                if !complete {
                    return Err(Rejection::BadAssignment { job: *job, partitions });
                }
                for (&partition, &node) in assignment {
                    let alive = members.get(&node).is_some_and(|m| m.liveness == Liveness::Alive);
                    if !alive {
                        return Err(Rejection::AssignedToUnavailable { job: *job, partition, node });
                    }
                }
                if let Some(master) = j.next_master(members) {
                    j.master = master;
                }
                j.epoch += 1;
                j.assignment = assignment.clone();
                j.state = JobState::Running;
                Ok(Outcome::Assigned { job: *job, epoch: j.epoch })
            }
            Op::Checkpoint { job, epoch, superstep } => {
                let j = self.live_job_mut(*job)?;
                check_epoch(j, *epoch)?;
                j.last_checkpoint = Some(Checkpoint { epoch: *epoch, superstep: *superstep });
                Ok(Outcome::Done)
            }
            Op::Complete { job, epoch, result_digest } => {
                let j = self.live_job_mut(*job)?;
                check_epoch(j, *epoch)?;
                j.state = JobState::Completed;
                j.result_digest = Some(*result_digest);
                Ok(Outcome::Done)
            }
            Op::Fail { job, epoch, reason } => {
                let j = self.live_job_mut(*job)?;
                check_epoch(j, *epoch)?;
                j.state = JobState::Failed(reason.clone());
                Ok(Outcome::Done)
            }
            Op::Cancel { job } => {
                let j = self.live_job_mut(*job)?;
                j.state = JobState::Cancelled;
                Ok(Outcome::Done)
            }
            Op::AddHolder { job, node } => {
                if !self.members.contains_key(node) {
                    return Err(Rejection::UnknownNode(*node));
                }
                let j = self.live_job_mut(*job)?;
                if !j.spec.holders.contains(node) {
                    j.spec.holders.push(*node);
                }
                Ok(Outcome::Done)
            }
            Op::AddToken { id, token, now_unix } => {
                self.prune_tokens(*now_unix);
                if self.tokens.contains_key(id) {
                    return Err(Rejection::TokenExists(id.clone()));
                }
                self.tokens.insert(id.clone(), token.clone());
                Ok(Outcome::Done)
            }
            Op::UseToken { id, secret_hash, purpose, now_unix } => {
                let refuse = |reason| Rejection::Token { id: id.clone(), reason };
                let t = self.tokens.get_mut(id).ok_or_else(|| refuse(TokenRefusal::Unknown))?;
                if t.secret_hash != *secret_hash {
                    return Err(refuse(TokenRefusal::WrongSecret));
                }
                if t.purpose != *purpose {
                    return Err(refuse(TokenRefusal::WrongPurpose));
                }
                if *now_unix >= t.expires_unix {
                    return Err(refuse(TokenRefusal::Expired));
                }
                match &mut t.uses_left {
                    Some(0) => return Err(refuse(TokenRefusal::AlreadyUsed)),
                    Some(n) => *n -= 1,
                    None => {}
                }
                Ok(Outcome::Done)
            }
        }
    }

    /// Forgets tokens that expired more than a day before `now_unix` (kept that long so a late
    /// use is refused as expired rather than unknown).
    fn prune_tokens(&mut self, now_unix: u64) {
        self.tokens.retain(|_, t| t.expires_unix.saturating_add(86_400) > now_unix);
    }

    /// Checks an API token's secret against the replicated state at wall-clock `now_unix`
    /// (read-only: API tokens are not spent).
    pub fn check_api_token(&self, id: &str, secret_hash: &Digest, now_unix: u64) -> Result<(), TokenRefusal> {
        let t = self.tokens.get(id).ok_or(TokenRefusal::Unknown)?;
        if t.secret_hash != *secret_hash {
            return Err(TokenRefusal::WrongSecret);
        }
        if t.purpose != TokenPurpose::Api {
            return Err(TokenRefusal::WrongPurpose);
        }
        if now_unix >= t.expires_unix {
            return Err(TokenRefusal::Expired);
        }
        Ok(())
    }

    /// Partitions of running jobs owned by `node` stay recorded (the epoch fences them) but the job
    /// needs a new assignment; nothing to do here beyond what `jobs_needing_placement` reports.
    fn orphan_assignments(&mut self, _node: NodeId) {}

    /// Running jobs with at least one partition on a member that is down or gone, and pending jobs.
    pub fn jobs_needing_placement(&self) -> impl Iterator<Item = &Job> {
        self.jobs.values().filter(move |j| match j.state {
            JobState::Pending => true,
            JobState::Running => {
                let down = |n: &NodeId| self.members.get(n).is_none_or(|m| m.liveness == Liveness::Down);
                // A down owner, or a down master that another alive holder can replace.
                j.assignment.values().any(down) || (down(&j.master) && j.next_master(&self.members).is_some())
            }
            _ => false,
        })
    }
}

fn check_epoch(job: &Job, epoch: u64) -> Result<(), Rejection> {
    if epoch != job.epoch {
        return Err(Rejection::StaleEpoch { job: job.id, got: epoch, current: job.epoch });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(id: NodeId) -> MemberInfo {
        MemberInfo {
            id,
            peer_addr: format!("10.0.0.{id}:7400"),
            control_addr: format!("10.0.0.{id}:7401"),
            cores: 4,
            memory_bytes: 1 << 30,
        }
    }

    fn cmd(client: u64, seq: u64, op: Op) -> Command {
        Command { request: RequestId { client, seq }, op }
    }

    fn spec(partitions: usize) -> JobSpec {
        JobSpec {
            name: "pr".into(),
            kernel: "pagerank".into(),
            params: vec![],
            iterations: 10,
            feature_width: 1,
            partitions: vec![PartitionShape { vertices: 10, edges: 100 }; partitions],
            holders: vec![],
        }
    }

    #[test]
    fn an_assignment_while_the_master_is_down_hands_the_job_to_another_holder() {
        let mut s = ClusterState::bootstrap(&[info(1), info(2), info(3)], &[1, 2, 3]);
        let held = JobSpec { holders: vec![2, 3], ..spec(2) };
        s.apply(4, &cmd(1, 1, Op::Submit { spec: held, graph_digest: [0; 32] }));
        assert_eq!(s.jobs[&4].master, 2, "the submitting holder masters first");
        let assign = |s: &mut ClusterState, index, epoch, to: [NodeId; 2]| {
            let a = [(0, to[0]), (1, to[1])].into();
            s.apply(index, &cmd(1, index, Op::Assign { job: 4, expected_epoch: epoch, assignment: a })).outcome
        };
        assert_eq!(assign(&mut s, 5, 0, [1, 2]), Outcome::Assigned { job: 4, epoch: 1 });
        assert_eq!(s.jobs_needing_placement().count(), 0);
        // The master goes down: the job needs a new epoch, and that epoch's master is holder 3.
        s.apply(6, &cmd(1, 6, Op::MarkDown { node: 2 }));
        assert_eq!(s.jobs_needing_placement().count(), 1);
        assert_eq!(assign(&mut s, 7, 1, [1, 3]), Outcome::Assigned { job: 4, epoch: 2 });
        assert_eq!(s.jobs[&4].master, 3);
        // It stays there when holder 2 comes back: one master per epoch, never two.
        s.apply(8, &cmd(1, 8, Op::MarkUp { node: 2 }));
        assert_eq!(s.jobs_needing_placement().count(), 0);
        assert_eq!(assign(&mut s, 9, 2, [1, 2]), Outcome::Assigned { job: 4, epoch: 3 });
        assert_eq!(s.jobs[&4].master, 3);
        // Both holders gone: the data is lost; one left is not.
        assert!(!s.jobs[&4].data_lost(&s.members));
        s.apply(10, &cmd(1, 10, Op::Leave { node: 2 }));
        assert!(!s.jobs[&4].data_lost(&s.members));
        s.apply(11, &cmd(1, 11, Op::Leave { node: 3 }));
        assert!(s.jobs[&4].data_lost(&s.members));
    }

    #[test]
    fn a_holder_added_after_submit_can_take_the_job_over() {
        let mut s = ClusterState::bootstrap(&[info(1), info(2), info(3)], &[1, 2, 3]);
        s.apply(4, &cmd(1, 1, Op::Submit { spec: JobSpec { holders: vec![2], ..spec(2) }, graph_digest: [0; 32] }));
        let add =
            |s: &mut ClusterState, index, node| s.apply(index, &cmd(1, index, Op::AddHolder { job: 4, node })).outcome;
        assert_eq!(add(&mut s, 5, 9), Outcome::Rejected(Rejection::UnknownNode(9)));
        assert_eq!(add(&mut s, 6, 3), Outcome::Done);
        assert_eq!(add(&mut s, 7, 3), Outcome::Done, "idempotent");
        assert_eq!(s.jobs[&4].spec.holders, vec![2, 3]);
        s.apply(8, &cmd(1, 8, Op::Leave { node: 2 }));
        assert!(!s.jobs[&4].data_lost(&s.members), "the added holder keeps the data");
        s.apply(9, &cmd(1, 9, Op::Cancel { job: 4 }));
        assert_eq!(add(&mut s, 10, 1), Outcome::Rejected(Rejection::JobFinished(4)));
    }

    #[test]
    fn retried_submit_returns_the_original_job_and_is_not_applied_twice() {
        let mut s = ClusterState::bootstrap(&[info(1)], &[1]);
        let submit = cmd(7, 1, Op::Submit { spec: spec(2), graph_digest: [1; 32] });
        let first = s.apply(10, &submit);
        assert_eq!(first, ApplyResult { outcome: Outcome::Submitted { job: 10 }, duplicate: false });
        let retry = s.apply(12, &submit);
        assert_eq!(retry, ApplyResult { outcome: Outcome::Submitted { job: 10 }, duplicate: true });
        assert_eq!(s.jobs.len(), 1);
    }

    #[test]
    fn stale_epoch_work_is_refused() {
        let mut s = ClusterState::bootstrap(&[info(1), info(2)], &[1, 2]);
        s.apply(3, &cmd(1, 1, Op::Submit { spec: spec(2), graph_digest: [0; 32] }));
        let assignment: BTreeMap<_, _> = [(0, 1), (1, 2)].into();
        let out = s.apply(4, &cmd(1, 2, Op::Assign { job: 3, expected_epoch: 0, assignment: assignment.clone() }));
        assert_eq!(out.outcome, Outcome::Assigned { job: 3, epoch: 1 });
        let again = s.apply(5, &cmd(1, 3, Op::Assign { job: 3, expected_epoch: 1, assignment }));
        assert_eq!(again.outcome, Outcome::Assigned { job: 3, epoch: 2 });
        let stale = s.apply(6, &cmd(2, 1, Op::Checkpoint { job: 3, epoch: 1, superstep: 4 }));
        assert_eq!(stale.outcome, Outcome::Rejected(Rejection::StaleEpoch { job: 3, got: 1, current: 2 }));
    }

    #[test]
    fn assignment_must_cover_every_partition_on_alive_nodes() {
        let mut s = ClusterState::bootstrap(&[info(1), info(2)], &[1, 2]);
        s.apply(3, &cmd(1, 1, Op::Submit { spec: spec(2), graph_digest: [0; 32] }));
        s.apply(4, &cmd(1, 2, Op::MarkDown { node: 2 }));
        let partial = s.apply(5, &cmd(1, 3, Op::Assign { job: 3, expected_epoch: 0, assignment: [(0, 1)].into() }));
        assert_eq!(partial.outcome, Outcome::Rejected(Rejection::BadAssignment { job: 3, partitions: 2 }));
        let down =
            s.apply(6, &cmd(1, 4, Op::Assign { job: 3, expected_epoch: 0, assignment: [(0, 1), (1, 2)].into() }));
        assert_eq!(down.outcome, Outcome::Rejected(Rejection::AssignedToUnavailable { job: 3, partition: 1, node: 2 }));
        assert_eq!(s.jobs_needing_placement().count(), 1);
    }

    #[test]
    fn join_tokens_are_single_use_and_expire() {
        let mut s = ClusterState::default();
        let token = Token { purpose: TokenPurpose::Join, secret_hash: [7; 32], expires_unix: 100, uses_left: Some(1) };
        let add = |id: &str| Op::AddToken { id: id.into(), token: token.clone(), now_unix: 10 };
        assert_eq!(s.apply(1, &cmd(1, 1, add("a"))).outcome, Outcome::Done);
        assert_eq!(s.apply(2, &cmd(1, 2, add("a"))).outcome, Outcome::Rejected(Rejection::TokenExists("a".into())));
        let use_ = |secret: u8, purpose, now_unix| Op::UseToken {
            id: "a".into(),
            secret_hash: [secret; 32],
            purpose,
            now_unix,
        };
        let refused = |reason| Outcome::Rejected(Rejection::Token { id: "a".into(), reason });
        assert_eq!(s.apply(3, &cmd(1, 3, use_(8, TokenPurpose::Join, 20))).outcome, refused(TokenRefusal::WrongSecret));
        assert_eq!(s.apply(4, &cmd(1, 4, use_(7, TokenPurpose::Api, 20))).outcome, refused(TokenRefusal::WrongPurpose));
        assert_eq!(s.apply(5, &cmd(1, 5, use_(7, TokenPurpose::Join, 100))).outcome, refused(TokenRefusal::Expired));
        assert_eq!(s.apply(6, &cmd(1, 6, use_(7, TokenPurpose::Join, 20))).outcome, Outcome::Done);
        assert_eq!(s.apply(7, &cmd(2, 1, use_(7, TokenPurpose::Join, 21))).outcome, refused(TokenRefusal::AlreadyUsed));
        assert_eq!(s.check_api_token("a", &[7; 32], 20), Err(TokenRefusal::WrongPurpose));
        // Expired tokens are forgotten a day later, when the next token is added.
        s.apply(8, &cmd(1, 7, Op::AddToken { id: "b".into(), token: token.clone(), now_unix: 100 + 86_400 }));
        assert!(!s.tokens.contains_key("a"));
    }

    #[test]
    fn dedup_window_forgets_old_requests_deterministically() {
        let mut s = ClusterState::default();
        for seq in 1..=DEDUP_WINDOW + 5 {
            s.apply(seq, &cmd(9, seq, Op::Join(info(seq))));
        }
        let old = s.apply(500, &cmd(9, 1, Op::Join(info(1))));
        assert!(old.duplicate);
        assert_eq!(old.outcome, Outcome::Rejected(Rejection::StaleRequest { client: 9, seq: 1 }));
    }
}
