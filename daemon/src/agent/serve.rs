//! The serving path: `Diffusion.Diffuse`, a small graph in, its diffused vector out, in
//! milliseconds. Owns request validation, admission (a bounded count of requests in flight),
//! the result cache, the forwarding of requests to less-loaded peers over QUIC, and the live
//! load each agent tells its peers. It must not run a kernel on an async thread: every
//! diffusion runs on the pinned [`Workers`].
//!
//! One request, in order:
//! 1. [`check`] validates it (`INVALID_ARGUMENT` naming the field and the reason). The graph is
//!    at most [`MAX_VERTICES`] vertices and [`MAX_EDGES`] edges: the serving path is for small
//!    graphs; bigger ones are jobs (`quiver submit`).
//! 2. The result cache answers repeated requests: the key is the SHA-256 of the edge arrays as
//!    sent, the vertex count, the features and the kernel parameters (seeds sorted, duplicates
//!    removed, as the kernels use them). Edge weights are not part of the key: the kernels ignore
//!    them. The cache is an LRU bounded in entries and in bytes.
//! 3. Admission: at most `queue_limit` requests are in flight on this node (computing, queued
//!    for a worker or forwarded); one more gets `RESOURCE_EXHAUSTED`.
//! 4. Forwarding: when this node's load (worker tasks in flight, this request included) is above
//!    `forward_threshold`, power-of-two-choices over live peers whose load report is fresh picks
//!    one; if it is less loaded, the request goes there on a `SERVING_FORWARD` stream. A forwarded
//!    request is never forwarded again, and a failed forward is computed here instead.
//! 5. Otherwise the CSR is built and [`kernels::run`] runs with one partition on a worker thread,
//!    the same code and inputs as `quiver run`, so the values are bit-identical to it.
//!
//! Peer protocol on a `SERVING_FORWARD` bidirectional stream: one `ControlRequest` whose opaque
//! body is `diffuse` (an encoded `DiffuseRequest`; answered by `diffused`, an encoded
//! `DiffuseResponse`, or an `ErrorReply` carrying the gRPC status code) or `load` (the sender's
//! load, u64 little-endian; answered by `load` with the receiver's). Every agent sends its load to
//! each connected live member every [`LOAD_EVERY`]; reports older than [`LOAD_STALE`] are ignored.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use prost::Message as _;
use quiver_compute::CsrBuilder;
use quiver_compute::buf::pod_bytes;
use quiver_compute::kernels::{self, Algorithm, Normalization, Params, Stop};
use quiver_coordinator::DetRng;
use quiver_coordinator::state::Liveness;
use quiver_node_agent::transport::{ErrorCode, InboundStream, NodeId, StreamHeader, StreamKind};
use quiver_node_agent::workers::Workers;
use quiver_proto::control::diffusion_server::{Diffusion, DiffusionServer};
use quiver_proto::control::{DiffuseRequest, DiffuseResponse, Kernel, KernelParams};
use quiver_proto::convert::unpack_ids;
use quiver_proto::peer::{ControlRequest, ControlResponse, ErrorReply, Opaque, control_request, control_response};
use tonic::{Request, Response, Status};

use super::Shared;

/// Most vertices a served graph may have.
pub const MAX_VERTICES: u32 = 1_000_000;
/// Most edges a served graph may have.
pub const MAX_EDGES: usize = 1_000_000;
/// Most iterations (Taylor terms for the heat kernel) a request may ask for.
pub const MAX_ITERATIONS: u32 = 1_000;
/// Most feature values (`vertices × width`) an APPNP request may carry (64 MiB of `f32`).
pub const MAX_FEATURE_VALUES: usize = 16 << 20;
/// Largest encoded `DiffuseRequest` accepted by gRPC; forwarding needs it to fit a peer message.
pub const MAX_REQUEST_BYTES: usize = 15 << 20;
/// How often an agent tells its peers its load.
pub const LOAD_EVERY: Duration = Duration::from_millis(50);
/// A peer's load report older than this is ignored (the peer is not a forwarding candidate).
pub const LOAD_STALE: Duration = Duration::from_secs(1);
/// Graphs up to this many edges run on one worker thread without rayon fan-out.
pub const SOLO_EDGES: usize = 64 << 10;
/// How long a forwarded request may take before this node computes it itself.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(5);

/// Serving knobs (`quiver agent --serve-*`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServeConfig {
    /// Requests in flight on this node before `RESOURCE_EXHAUSTED`.
    pub queue_limit: usize,
    /// Worker load above which a request is offered to a less-loaded peer (0: always offer).
    pub forward_threshold: usize,
    /// Result cache bounds.
    pub cache_entries: usize,
    pub cache_bytes: usize,
}

impl ServeConfig {
    /// Defaults for `threads` worker threads: a queue of 4 × threads × 64 requests, forwarding
    /// once more than 4 tasks per worker thread are waiting, 4096 cached results up to 64 MiB.
    pub fn defaults(threads: usize) -> Self {
        ServeConfig {
            queue_limit: 4 * threads.max(1) * 64,
            forward_threshold: 4 * threads.max(1),
            cache_entries: 4096,
            cache_bytes: 64 << 20,
        }
    }
}

/// The serving state one agent shares between its gRPC handlers and peer streams.
pub struct Serving {
    cfg: ServeConfig,
    workers: Workers,
    in_flight: AtomicUsize,
    next_pool: AtomicUsize,
    cache: Mutex<ResultCache>,
    /// Live load of peers: node id → (load, when reported).
    peers: DashMap<u64, (u64, Instant)>,
    rng: Mutex<DetRng>,
    request_ids: AtomicU64,
    metrics: ServeMetrics,
}

/// The per-request metrics, registered once: each `metrics::counter!` call looks its key up in
/// the registry (hashing it, and copying its labels), several times per request.
struct ServeMetrics {
    /// `quiver_serve_requests_total` by outcome, in [`OUTCOMES`] order.
    requests: [metrics::Counter; 4],
    request_seconds: metrics::Histogram,
    cache_hits: metrics::Counter,
    cache_misses: metrics::Counter,
    cache_entries: metrics::Gauge,
    cache_bytes: metrics::Gauge,
    queue_depth: metrics::Gauge,
}

/// The `outcome` label of `quiver_serve_requests_total`.
const OUTCOMES: [&str; 4] = ["ok", "invalid", "rejected", "error"];

impl ServeMetrics {
    fn new() -> Self {
        ServeMetrics {
            requests: OUTCOMES.map(|o| metrics::counter!("quiver_serve_requests_total", "outcome" => o)),
            request_seconds: metrics::histogram!("quiver_serve_request_seconds"),
            cache_hits: metrics::counter!("quiver_serve_cache_hits_total"),
            cache_misses: metrics::counter!("quiver_serve_cache_misses_total"),
            cache_entries: metrics::gauge!("quiver_serve_cache_entries"),
            cache_bytes: metrics::gauge!("quiver_serve_cache_bytes"),
            queue_depth: metrics::gauge!("quiver_serve_queue_depth"),
        }
    }

    /// Counts one answered request.
    fn answered(&self, code: tonic::Code, seconds: f64) {
        let outcome = match code {
            tonic::Code::Ok => 0,
            tonic::Code::InvalidArgument => 1,
            tonic::Code::ResourceExhausted => 2,
            _ => 3,
        };
        self.requests[outcome].increment(1);
        self.request_seconds.record(seconds);
    }
}

impl Serving {
    pub fn new(node_id: u64, workers: Workers, cfg: ServeConfig) -> Self {
        Serving {
            cache: Mutex::new(ResultCache::new(cfg.cache_entries, cfg.cache_bytes)),
            cfg,
            workers,
            in_flight: AtomicUsize::new(0),
            next_pool: AtomicUsize::new(0),
            peers: DashMap::new(),
            rng: Mutex::new(DetRng::new(node_id ^ 0x5e7e_d1ff_0000_0001)),
            request_ids: AtomicU64::new(1),
            metrics: ServeMetrics::new(),
        }
    }

    /// Stores an answer in the result cache and publishes the cache's size.
    fn store(&self, key: [u8; 32], answer: Arc<Answer>) {
        let mut c = self.cache.lock().expect("cache lock");
        c.insert(key, answer);
        self.metrics.cache_entries.set(c.len() as f64);
        self.metrics.cache_bytes.set(c.bytes() as f64);
    }

    /// This node's live load as peers see it: worker tasks in flight.
    pub fn load(&self) -> u64 {
        self.workers.load() as u64
    }

    /// `peer`'s last reported load, unless older than [`LOAD_STALE`] (for the web view).
    pub fn peer_live_load(&self, peer: u64) -> Option<u64> {
        self.peers.get(&peer).filter(|e| e.1.elapsed() < LOAD_STALE).map(|e| e.0)
    }

    /// Records `peer`'s reported load.
    fn peer_load(&self, peer: u64, load: u64) {
        self.peers.insert(peer, (load, Instant::now()));
    }
}

/// The `Diffusion` gRPC service.
pub fn service(shared: Shared) -> DiffusionServer<DiffusionSvc> {
    DiffusionServer::new(DiffusionSvc { shared })
        .max_decoding_message_size(MAX_REQUEST_BYTES)
        .max_encoding_message_size(64 << 20)
}

pub struct DiffusionSvc {
    shared: Shared,
}

#[tonic::async_trait]
impl Diffusion for DiffusionSvc {
    async fn diffuse(&self, req: Request<DiffuseRequest>) -> Result<Response<DiffuseResponse>, Status> {
        let started = Instant::now();
        let result = diffuse(&self.shared, req.into_inner(), Origin::Client).await;
        let code = result.as_ref().map_or_else(Status::code, |_| tonic::Code::Ok);
        self.shared.serving.metrics.answered(code, started.elapsed().as_secs_f64());
        result.map(Response::new)
    }
}

/// Where a request came from: a client may be forwarded, a peer's request may not.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Origin {
    Client,
    Peer(u64),
}

fn invalid(field: &str, reason: impl std::fmt::Display) -> Status {
    Status::invalid_argument(format!("{field}: {reason}"))
}

/// The kernel a request asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelKind {
    PageRank,
    Ppr,
    Heat,
    Appnp,
}

/// A request's parameters after validation (the arrays stay in the request).
#[derive(Clone, Debug, PartialEq)]
pub struct Checked {
    pub vertices: u32,
    pub kernel: KernelKind,
    /// Damping (pagerank, ppr), t (heat) or alpha (appnp), as `quiver run` takes it (`f32`).
    pub coefficient: f32,
    pub stop: Stop,
    /// Sorted, without duplicates.
    pub seeds: Vec<u32>,
    /// Values per vertex (the APPNP feature width; 1 otherwise).
    pub width: usize,
    pub random_walk: bool,
}

/// Moves packed ids (`sources_le`, `targets_le`) into `sources` and `targets`, so checks, cache
/// key, compute and forwarding see one form whichever the client sent. The error is
/// `INVALID_ARGUMENT` naming the field: both forms at once, or a length that is not whole ids.
pub fn unpack_edges(mut req: DiffuseRequest) -> Result<DiffuseRequest, Status> {
    if req.sources_le.is_empty() && req.targets_le.is_empty() {
        return Ok(req);
    }
    if !req.sources.is_empty() || !req.targets.is_empty() {
        return Err(invalid("sources_le", "set together with sources/targets: send the edge list one way"));
    }
    let ids = |field: &str, bytes: Vec<u8>| {
        unpack_ids(&bytes)
            .ok_or_else(|| invalid(field, format!("{} bytes are not whole 4-byte vertex ids", bytes.len())))
    };
    req.sources = ids("sources_le", std::mem::take(&mut req.sources_le))?;
    req.targets = ids("targets_le", std::mem::take(&mut req.targets_le))?;
    Ok(req)
}

/// Validates a request; the error is `INVALID_ARGUMENT` naming the field and the reason.
pub fn check(req: &DiffuseRequest) -> Result<Checked, Status> {
    let n = req.vertices;
    if n == 0 {
        return Err(invalid("vertices", "must be at least 1"));
    }
    if n > MAX_VERTICES {
        return Err(invalid(
            "vertices",
            format!("{n} exceeds the serving limit of {MAX_VERTICES}; submit larger graphs as jobs"),
        ));
    }
    if req.sources.len() != req.targets.len() {
        return Err(invalid(
            "targets",
            format!("has {} entries but sources has {}: they must pair up", req.targets.len(), req.sources.len()),
        ));
    }
    if req.sources.len() > MAX_EDGES {
        return Err(invalid(
            "sources",
            format!(
                "{} edges exceed the serving limit of {MAX_EDGES}; submit larger graphs as jobs",
                req.sources.len()
            ),
        ));
    }
    for (field, ids) in [("sources", &req.sources), ("targets", &req.targets)] {
        if let Some(i) = ids.iter().position(|&v| v >= n) {
            return Err(invalid(&format!("{field}[{i}]"), format!("vertex {} is not below vertices = {n}", ids[i])));
        }
    }
    if !req.weights.is_empty() {
        if req.weights.len() != req.sources.len() {
            return Err(invalid(
                "weights",
                format!(
                    "has {} entries for {} edges (send none or one per edge)",
                    req.weights.len(),
                    req.sources.len()
                ),
            ));
        }
        if let Some(i) = req.weights.iter().position(|w| !(w.is_finite() && *w >= 0.0)) {
            return Err(invalid(
                &format!("weights[{i}]"),
                format!("{} is not a finite non-negative number", req.weights[i]),
            ));
        }
    }
    let p: &KernelParams =
        req.params.as_ref().ok_or_else(|| invalid("params", "missing: the request needs an algorithm"))?;
    let kernel = match Kernel::try_from(p.kernel) {
        Ok(Kernel::Pagerank) => KernelKind::PageRank,
        Ok(Kernel::PersonalizedPagerank) => KernelKind::Ppr,
        Ok(Kernel::Heat) => KernelKind::Heat,
        Ok(Kernel::Appnp) => KernelKind::Appnp,
        _ => {
            return Err(invalid(
                "params.kernel",
                format!("unknown algorithm {}; expected pagerank, ppr, heat or appnp", p.kernel),
            ));
        }
    };
    if p.max_iterations == 0 {
        return Err(invalid("params.max_iterations", "must be at least 1"));
    }
    if p.max_iterations > MAX_ITERATIONS {
        return Err(invalid(
            "params.max_iterations",
            format!("{} exceeds the serving limit of {MAX_ITERATIONS}", p.max_iterations),
        ));
    }
    if !(p.tolerance.is_finite() && p.tolerance >= 0.0) {
        return Err(invalid("params.tolerance", format!("{} is not a non-negative number", p.tolerance)));
    }
    if kernel == KernelKind::Heat {
        if !(p.alpha.is_finite() && p.alpha >= 0.0) {
            return Err(invalid("params.alpha", format!("heat kernel time {} is not a finite number ≥ 0", p.alpha)));
        }
    } else if !(p.alpha.is_finite() && (0.0..=1.0).contains(&p.alpha)) {
        return Err(invalid("params.alpha", format!("{} is outside [0, 1]", p.alpha)));
    }
    let mut seeds = Vec::new();
    if matches!(kernel, KernelKind::Ppr | KernelKind::Heat) {
        if p.seeds.is_empty() {
            return Err(invalid("params.seeds", "ppr and heat need at least one seed vertex"));
        }
        if let Some(i) = p.seeds.iter().position(|&s| s >= n) {
            return Err(invalid(
                &format!("params.seeds[{i}]"),
                format!("vertex {} is not below vertices = {n}", p.seeds[i]),
            ));
        }
        seeds = p.seeds.clone();
        seeds.sort_unstable();
        seeds.dedup();
    }
    let width = if kernel == KernelKind::Appnp {
        if p.width == 0 {
            return Err(invalid("params.width", "appnp needs a feature width of at least 1"));
        }
        let expected = (n as usize).checked_mul(p.width as usize).filter(|&e| e <= MAX_FEATURE_VALUES);
        let Some(expected) = expected else {
            return Err(invalid(
                "params.width",
                format!(
                    "{n} vertices × width {} exceeds the serving limit of {MAX_FEATURE_VALUES} feature values",
                    p.width
                ),
            ));
        };
        if req.features.len() != expected {
            return Err(invalid(
                "features",
                format!(
                    "has {} values, expected vertices × width = {n} × {} = {expected}",
                    req.features.len(),
                    p.width
                ),
            ));
        }
        if let Some(i) = req.features.iter().position(|x| !x.is_finite()) {
            return Err(invalid(&format!("features[{i}]"), format!("{} is not a finite number", req.features[i])));
        }
        p.width as usize
    } else {
        if !req.features.is_empty() {
            return Err(invalid("features", "only appnp takes features"));
        }
        1
    };
    let stop = if p.tolerance > 0.0 {
        Stop::tolerance(p.tolerance as f32, p.max_iterations)
    } else {
        Stop::iterations(p.max_iterations)
    };
    Ok(Checked { vertices: n, kernel, coefficient: p.alpha as f32, stop, seeds, width, random_walk: p.random_walk })
}

/// The cache key: SHA-256 of the graph as sent (vertex count, edge arrays), the features and
/// the checked parameters. Lengths are hashed before arrays so no two requests share a stream.
/// Arrays are hashed as their memory (host byte order): a key never leaves its node.
pub fn cache_key(req: &DiffuseRequest, c: &Checked) -> [u8; 32] {
    let mut h = ring::digest::Context::new(&ring::digest::SHA256);
    h.update(b"quiver-serve-v1\0");
    h.update(&c.vertices.to_le_bytes());
    h.update(&(req.sources.len() as u64).to_le_bytes());
    h.update(pod_bytes(&req.sources));
    h.update(pod_bytes(&req.targets));
    h.update(&(req.features.len() as u64).to_le_bytes());
    h.update(pod_bytes(&req.features));
    h.update(&[c.kernel as u8, u8::from(c.random_walk)]);
    h.update(&c.coefficient.to_le_bytes());
    h.update(&c.stop.max_iterations.to_le_bytes());
    h.update(&c.stop.tolerance.map_or(-1.0f32, |t| t).to_le_bytes());
    h.update(&(c.width as u64).to_le_bytes());
    h.update(&(c.seeds.len() as u64).to_le_bytes());
    h.update(pod_bytes(&c.seeds));
    h.finish().as_ref().try_into().expect("SHA-256 is 32 bytes")
}

/// A computed answer, as cached.
#[derive(Clone, Debug, PartialEq)]
pub struct Answer {
    pub values: Vec<f32>,
    pub width: u32,
    pub iterations: u32,
    pub residual: f64,
}

impl Answer {
    fn bytes(&self) -> usize {
        self.values.len() * 4 + 96
    }

    fn response(&self, served_by: u64, cached: bool) -> DiffuseResponse {
        DiffuseResponse {
            values: self.values.clone(),
            iterations: self.iterations,
            residual: self.residual,
            served_by,
            width: self.width,
            cached,
        }
    }
}

/// A least-recently-used map of results, bounded in entries and in bytes.
#[derive(Debug)]
pub struct ResultCache {
    max_entries: usize,
    max_bytes: usize,
    bytes: usize,
    tick: u64,
    map: HashMap<[u8; 32], (Arc<Answer>, u64)>,
    /// Recency: tick of last use → key (the first entry is the least recently used).
    order: BTreeMap<u64, [u8; 32]>,
}

impl ResultCache {
    pub fn new(max_entries: usize, max_bytes: usize) -> Self {
        ResultCache { max_entries, max_bytes, bytes: 0, tick: 0, map: HashMap::new(), order: BTreeMap::new() }
    }

    /// The cached answer for `key`, marking it most recently used.
    pub fn get(&mut self, key: &[u8; 32]) -> Option<Arc<Answer>> {
        self.tick += 1;
        let (answer, used) = self.map.get_mut(key)?;
        self.order.remove(used);
        *used = self.tick;
        self.order.insert(self.tick, *key);
        Some(answer.clone())
    }

    /// Stores `answer`, evicting the least recently used entries until both bounds hold. An
    /// answer larger than the byte bound is not stored.
    pub fn insert(&mut self, key: [u8; 32], answer: Arc<Answer>) {
        let size = answer.bytes();
        if size > self.max_bytes || self.max_entries == 0 {
            return;
        }
        self.tick += 1;
        if let Some((old, used)) = self.map.insert(key, (answer, self.tick)) {
            self.order.remove(&used);
            self.bytes -= old.bytes();
        }
        self.order.insert(self.tick, key);
        self.bytes += size;
        while self.map.len() > self.max_entries || self.bytes > self.max_bytes {
            let Some((_, oldest)) = self.order.pop_first() else { break };
            if let Some((old, _)) = self.map.remove(&oldest) {
                self.bytes -= old.bytes();
            }
        }
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

/// Releases one admission slot when the request is done, however it ends.
struct Admitted<'a>(&'a Serving);

impl Drop for Admitted<'_> {
    fn drop(&mut self) {
        let depth = self.0.in_flight.fetch_sub(1, Ordering::Relaxed) - 1;
        self.0.metrics.queue_depth.set(depth as f64);
    }
}

fn admit(s: &Serving) -> Result<Admitted<'_>, Status> {
    let depth = s.in_flight.fetch_add(1, Ordering::Relaxed) + 1;
    let slot = Admitted(s);
    if depth > s.cfg.queue_limit {
        return Err(Status::resource_exhausted(format!(
            "serving queue full: {} requests in flight on this node (limit {}); retry later or send to another node",
            depth - 1,
            s.cfg.queue_limit
        )));
    }
    s.metrics.queue_depth.set(depth as f64);
    Ok(slot)
}

async fn diffuse(shared: &Shared, req: DiffuseRequest, origin: Origin) -> Result<DiffuseResponse, Status> {
    let s = &*shared.serving;
    let req = unpack_edges(req)?;
    let checked = check(&req)?;
    let key = cache_key(&req, &checked);
    let hit = s.cache.lock().expect("cache lock").get(&key);
    if let Some(answer) = hit {
        s.metrics.cache_hits.increment(1);
        return Ok(answer.response(shared.node_id, true));
    }
    s.metrics.cache_misses.increment(1);
    let _slot = admit(s)?;
    if origin == Origin::Client
        && let Some(peer) = forward_target(shared)
    {
        match forward(shared, peer, &req).await {
            Ok(resp) => {
                metrics::counter!("quiver_serve_forwards_total", "result" => "ok").increment(1);
                let answer = Answer {
                    values: resp.values.clone(),
                    width: resp.width,
                    iterations: resp.iterations,
                    residual: resp.residual,
                };
                s.store(key, Arc::new(answer));
                return Ok(resp);
            }
            Err(e) => {
                metrics::counter!("quiver_serve_forwards_total", "result" => "failed").increment(1);
                tracing::debug!(peer, error = %e, "forwarding a diffusion failed; computing it here");
            }
        }
    }
    // Graphs of the serving sizes compute in well under a millisecond: splitting them across
    // threads costs more than it saves, so they run whole on one worker; bigger ones fan out.
    let edges = req.sources.len();
    let pool = s.next_pool.fetch_add(1, Ordering::Relaxed);
    let run = move || compute(req, checked);
    let answer = if edges <= SOLO_EDGES { s.workers.run_solo(pool, run).await } else { s.workers.run(pool, run).await };
    let answer = answer
        .map_err(|e| Status::internal(format!("diffusion: {e}")))?
        .map_err(|e| Status::invalid_argument(format!("params: {e}")))?;
    let answer = Arc::new(answer);
    let resp = answer.response(shared.node_id, false);
    s.store(key, answer);
    Ok(resp)
}

/// Builds the CSR and runs the kernel with one partition: `quiver run`'s code on its inputs.
/// Runs on a worker thread.
fn compute(req: DiffuseRequest, c: Checked) -> Result<Answer, String> {
    let DiffuseRequest { sources, targets, features, .. } = req;
    // Weights are dropped: the kernels ignore them.
    let g = CsrBuilder::from_edges(sources, targets, None)
        .vertices(u64::from(c.vertices))
        .build()
        .map_err(|e| e.to_string())?;
    let algorithm = match c.kernel {
        KernelKind::PageRank => Algorithm::PageRank { damping: c.coefficient },
        KernelKind::Ppr => Algorithm::PersonalizedPageRank { damping: c.coefficient, seeds: &c.seeds },
        KernelKind::Heat => Algorithm::HeatKernel { t: c.coefficient, seeds: &c.seeds },
        KernelKind::Appnp => Algorithm::Appnp {
            alpha: c.coefficient,
            normalization: if c.random_walk { Normalization::RandomWalk } else { Normalization::Symmetric },
            features: &features,
            dim: c.width,
        },
    };
    let out = kernels::run(&g, &Params { algorithm, stop: c.stop }, 1).map_err(|e| e.to_string())?;
    Ok(Answer {
        values: out.values.to_vec(),
        width: out.width as u32,
        iterations: out.iterations,
        residual: f64::from(out.residual),
    })
}

/// The peer to forward to, if this node is loaded and power-of-two-choices over live peers with
/// fresh load reports finds a less-loaded one.
fn forward_target(shared: &Shared) -> Option<u64> {
    let s = &*shared.serving;
    let mine = s.load() + 1;
    if mine <= s.cfg.forward_threshold as u64 {
        return None;
    }
    let view = shared.view.borrow().clone();
    let candidates: Vec<(u64, u32)> = s
        .peers
        .iter()
        .filter(|e| e.value().1.elapsed() < LOAD_STALE)
        .filter(|e| view.state.members.get(e.key()).is_some_and(|m| m.liveness == Liveness::Alive))
        .map(|e| (*e.key(), e.value().0.min(u64::from(u32::MAX)) as u32))
        .collect();
    let pick = quiver_coordinator::scheduler::pick_two(&candidates, &mut s.rng.lock().expect("rng lock"))?;
    let load = candidates.iter().find(|(id, _)| *id == pick).map_or(u64::MAX, |(_, l)| u64::from(*l));
    (load < mine).then_some(pick)
}

/// Why a forward produced no answer.
#[derive(Debug, thiserror::Error)]
enum ForwardError {
    #[error("{0}")]
    Transport(String),
    #[error("node {peer} answered {code:?}: {message}")]
    Refused { peer: u64, code: tonic::Code, message: String },
    #[error("the request is too large to forward")]
    TooLarge,
}

async fn forward(shared: &Shared, peer: u64, req: &DiffuseRequest) -> Result<DiffuseResponse, ForwardError> {
    let body = req.encode_to_vec();
    if body.len() > MAX_REQUEST_BYTES {
        return Err(ForwardError::TooLarge);
    }
    match call(shared, peer, "diffuse", body).await? {
        Reply::Body(b) => DiffuseResponse::decode(&b[..])
            .map_err(|e| ForwardError::Transport(format!("node {peer}: undecodable answer: {e}"))),
        Reply::Error { code, message } => Err(ForwardError::Refused { peer, code, message }),
    }
}

enum Reply {
    Body(Vec<u8>),
    Error { code: tonic::Code, message: String },
}

/// One request/response on a fresh `SERVING_FORWARD` stream to `peer`.
async fn call(shared: &Shared, peer: u64, kind: &str, body: Vec<u8>) -> Result<Reply, ForwardError> {
    let t = |e: &dyn std::fmt::Display| ForwardError::Transport(format!("node {peer}: {e}"));
    let request_id = shared.serving.request_ids.fetch_add(1, Ordering::Relaxed);
    let exchange = async {
        let conn = shared.transport.connection(NodeId(peer)).await.map_err(|e| t(&e))?;
        let header = StreamHeader { kind: StreamKind::ServingForward as i32, request_id, ..Default::default() };
        let (mut send, mut recv) = conn.open_bi(header).await.map_err(|e| t(&e))?;
        let req = ControlRequest {
            request_id,
            body: Some(control_request::Body::Opaque(Opaque { kind: kind.into(), body })),
        };
        send.send_message(&req).await.map_err(|e| t(&e))?;
        send.finish().map_err(|e| t(&e))?;
        let resp = recv
            .recv_message::<ControlResponse>()
            .await
            .map_err(|e| t(&e))?
            .ok_or_else(|| t(&"closed the stream without answering"))?;
        match resp.body {
            Some(control_response::Body::Opaque(o)) if o.kind == kind_reply(kind) => Ok(Reply::Body(o.body)),
            Some(control_response::Body::Error(e)) => {
                Ok(Reply::Error { code: tonic::Code::from_i32(e.code as i32), message: e.message })
            }
            _ => Err(t(&"unexpected answer")),
        }
    };
    tokio::time::timeout(FORWARD_TIMEOUT, exchange).await.map_err(|_| t(&"did not answer in time"))?
}

fn kind_reply(kind: &str) -> &'static str {
    if kind == "diffuse" { "diffused" } else { "load" }
}

/// Answers one inbound `SERVING_FORWARD` stream (called by the peer stream dispatcher).
pub async fn handle_stream(shared: Shared, mut s: InboundStream) {
    let Some(mut send) = s.send.take() else {
        s.recv.reject(ErrorCode::Refused, &"serving forward streams are bidirectional");
        return;
    };
    let req = match s.recv.recv_message::<ControlRequest>().await {
        Ok(Some(r)) => r,
        Ok(None) => return,
        Err(e) => {
            tracing::warn!(peer = %s.peer, error = %e, "bad serving forward request");
            return;
        }
    };
    let error = |code: tonic::Code, message: String| {
        control_response::Body::Error(ErrorReply { code: code as i32 as u32, message })
    };
    let body = match req.body {
        Some(control_request::Body::Opaque(Opaque { kind, body })) if kind == "diffuse" => {
            metrics::counter!("quiver_serve_forwarded_in_total").increment(1);
            match DiffuseRequest::decode(&body[..]) {
                Ok(r) => match diffuse(&shared, r, Origin::Peer(s.peer.0)).await {
                    Ok(resp) => {
                        control_response::Body::Opaque(Opaque { kind: "diffused".into(), body: resp.encode_to_vec() })
                    }
                    Err(st) => error(st.code(), st.message().to_string()),
                },
                Err(e) => error(tonic::Code::InvalidArgument, format!("undecodable DiffuseRequest: {e}")),
            }
        }
        Some(control_request::Body::Opaque(Opaque { kind, body })) if kind == "load" => {
            match <[u8; 8]>::try_from(&body[..]) {
                Ok(b) => {
                    shared.serving.peer_load(s.peer.0, u64::from_le_bytes(b));
                    control_response::Body::Opaque(Opaque {
                        kind: "load".into(),
                        body: shared.serving.load().to_le_bytes().to_vec(),
                    })
                }
                Err(_) => error(tonic::Code::InvalidArgument, "load: expected 8 bytes".into()),
            }
        }
        _ => error(tonic::Code::InvalidArgument, "serving forward: expected a diffuse or load request".into()),
    };
    let _ = send.send_message(&ControlResponse { request_id: req.request_id, body: Some(body) }).await;
    let _ = send.finish();
}

/// Tells every connected live member this node's load every [`LOAD_EVERY`], learning theirs from
/// the answers (so both directions stay fresh even if only one side sends).
pub fn spawn_load_reports(shared: Shared) {
    tokio::spawn(async move {
        let mut ticker = tokio::time::interval(LOAD_EVERY);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            let view = shared.view.borrow().clone();
            for peer in shared.transport.connected_peers() {
                if peer.0 == shared.node_id
                    || !view.state.members.get(&peer.0).is_some_and(|m| m.liveness == Liveness::Alive)
                {
                    continue;
                }
                let shared = shared.clone();
                tokio::spawn(async move {
                    let mine = shared.serving.load().to_le_bytes().to_vec();
                    match call(&shared, peer.0, "load", mine).await {
                        Ok(Reply::Body(b)) => {
                            if let Ok(b) = <[u8; 8]>::try_from(&b[..]) {
                                shared.serving.peer_load(peer.0, u64::from_le_bytes(b));
                            }
                        }
                        Ok(Reply::Error { message, .. }) => tracing::debug!(%peer, %message, "load report refused"),
                        Err(e) => tracing::debug!(%peer, error = %e, "load report failed"),
                    }
                });
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ppr(vertices: u32, edges: &[(u32, u32)], seeds: &[u32], iterations: u32) -> DiffuseRequest {
        DiffuseRequest {
            vertices,
            sources: edges.iter().map(|e| e.0).collect(),
            targets: edges.iter().map(|e| e.1).collect(),
            weights: vec![],
            params: Some(KernelParams {
                kernel: Kernel::PersonalizedPagerank as i32,
                alpha: 0.85,
                max_iterations: iterations,
                seeds: seeds.to_vec(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// `check` on a mutated request fails naming `field`.
    #[track_caller]
    fn refused(field: &str, change: impl FnOnce(&mut DiffuseRequest)) {
        let mut r = ppr(4, &[(0, 1), (1, 2), (2, 0), (2, 3)], &[0], 10);
        change(&mut r);
        let e = check(&r).unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
        assert!(e.message().starts_with(&format!("{field}: ")), "expected {field:?}, got {:?}", e.message());
    }

    #[test]
    fn bad_requests_name_the_field_and_reason() {
        refused("vertices", |r| r.vertices = 0);
        refused("vertices", |r| r.vertices = MAX_VERTICES + 1);
        refused("targets", |r| r.targets.pop().map(drop).unwrap_or_default());
        refused("sources[1]", |r| r.sources[1] = 4);
        refused("targets[3]", |r| r.targets[3] = 99);
        refused("weights", |r| r.weights = vec![1.0]);
        refused("weights[2]", |r| r.weights = vec![1.0, 1.0, f32::NAN, 1.0]);
        refused("params", |r| r.params = None);
        refused("params.kernel", |r| r.params.as_mut().unwrap().kernel = 42);
        refused("params.max_iterations", |r| r.params.as_mut().unwrap().max_iterations = 0);
        refused("params.max_iterations", |r| r.params.as_mut().unwrap().max_iterations = MAX_ITERATIONS + 1);
        refused("params.tolerance", |r| r.params.as_mut().unwrap().tolerance = -1.0);
        refused("params.alpha", |r| r.params.as_mut().unwrap().alpha = 1.5);
        refused("params.seeds", |r| r.params.as_mut().unwrap().seeds.clear());
        refused("params.seeds[1]", |r| r.params.as_mut().unwrap().seeds = vec![0, 4]);
        refused("features", |r| r.features = vec![1.0; 4]);
        let appnp = |r: &mut DiffuseRequest| {
            let p = r.params.as_mut().unwrap();
            p.kernel = Kernel::Appnp as i32;
            p.alpha = 0.1;
            p.width = 2;
            r.features = vec![0.5; 8];
        };
        refused("params.width", |r| {
            appnp(r);
            r.params.as_mut().unwrap().width = 0;
        });
        refused("features", |r| {
            appnp(r);
            r.features.pop();
        });
        refused("features[3]", |r| {
            appnp(r);
            r.features[3] = f32::INFINITY;
        });
        let mut ok = ppr(4, &[(0, 1)], &[0], 10);
        appnp(&mut ok);
        assert_eq!(check(&ok).unwrap().width, 2);
        // Heat takes t beyond 1.
        let mut heat = ppr(4, &[(0, 1)], &[3, 0, 3], 10);
        heat.params.as_mut().unwrap().kernel = Kernel::Heat as i32;
        heat.params.as_mut().unwrap().alpha = 3.0;
        let c = check(&heat).unwrap();
        assert_eq!((c.kernel, c.seeds), (KernelKind::Heat, vec![0, 3]));
    }

    #[test]
    fn results_equal_the_single_process_run() {
        let edges = [(0, 1), (1, 2), (2, 0), (2, 3), (3, 3), (0, 1)];
        let r = ppr(5, &edges, &[2, 0], 10);
        let c = check(&r).unwrap();
        let got = compute(r, c).unwrap();
        let mut b = CsrBuilder::new().vertices(5);
        for &(u, v) in &edges {
            b.push(u, v, None);
        }
        let g = b.build().unwrap();
        let seeds = [0, 2];
        let params = Params {
            algorithm: Algorithm::PersonalizedPageRank { damping: 0.85, seeds: &seeds },
            stop: Stop::iterations(10),
        };
        let want = kernels::run(&g, &params, 1).unwrap();
        assert_eq!(
            got.values.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
            want.values.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
        );
        assert_eq!((got.iterations, got.width), (10, 1));
    }

    fn packed(mut r: DiffuseRequest) -> DiffuseRequest {
        r.pack_edges();
        r
    }

    #[test]
    fn packed_edges_are_the_same_request() {
        let plain = ppr(5, &[(0, 1), (1, 2), (2, 0), (4, 3)], &[2], 10);
        let unpacked = unpack_edges(packed(plain.clone())).unwrap();
        assert_eq!(unpacked, plain);
        assert_eq!(cache_key(&unpacked, &check(&unpacked).unwrap()), cache_key(&plain, &check(&plain).unwrap()));
        // A request without packed ids passes through untouched.
        assert_eq!(unpack_edges(plain.clone()).unwrap(), plain);
        let refused = |r: DiffuseRequest, field: &str| {
            let e = unpack_edges(r).unwrap_err();
            assert_eq!(e.code(), tonic::Code::InvalidArgument);
            assert!(e.message().starts_with(field), "{}", e.message());
        };
        let mut both = packed(plain.clone());
        both.sources = vec![0];
        refused(both, "sources_le");
        let mut ragged = packed(plain.clone());
        ragged.targets_le.pop();
        refused(ragged, "targets_le");
        // Ids past `vertices` and unequal lengths are caught by `check`, as for the plain form.
        let mut far = packed(plain.clone());
        far.sources_le[4..8].copy_from_slice(&9u32.to_le_bytes());
        assert!(check(&unpack_edges(far).unwrap()).unwrap_err().message().starts_with("sources[1]"));
        let mut short = packed(plain);
        short.targets_le.truncate(8);
        assert!(check(&unpack_edges(short).unwrap()).unwrap_err().message().starts_with("targets"));
    }

    #[test]
    fn cache_keys_follow_content_and_parameters() {
        let r = ppr(4, &[(0, 1), (1, 2)], &[1, 0], 10);
        let key = |r: &DiffuseRequest| cache_key(r, &check(r).unwrap());
        let k = key(&r);
        // Seeds are canonical; weights do not change the result, so not the key either.
        let mut same = ppr(4, &[(0, 1), (1, 2)], &[0, 1, 1], 10);
        same.weights = vec![2.0, 3.0];
        assert_eq!(key(&same), k);
        for different in [
            ppr(5, &[(0, 1), (1, 2)], &[1, 0], 10),
            ppr(4, &[(0, 1), (1, 3)], &[1, 0], 10),
            ppr(4, &[(0, 1), (1, 2)], &[1], 10),
            ppr(4, &[(0, 1), (1, 2)], &[1, 0], 11),
            ppr(4, &[(0, 1), (2, 1)], &[1, 0], 10),
        ] {
            assert_ne!(key(&different), k, "{different:?}");
        }
        // Moving an edge between the two arrays' boundaries cannot collide: lengths are hashed.
        assert_ne!(key(&ppr(4, &[(0, 1)], &[0], 10)), key(&ppr(4, &[], &[0], 10)));
    }

    fn answer(n: usize) -> Arc<Answer> {
        Arc::new(Answer { values: vec![0.5; n], width: 1, iterations: 1, residual: 0.0 })
    }

    #[test]
    fn cache_evicts_least_recently_used_within_entry_and_byte_bounds() {
        let key = |i: u8| [i; 32];
        let mut c = ResultCache::new(3, 1 << 20);
        for i in 0..3 {
            c.insert(key(i), answer(4));
        }
        assert!(c.get(&key(0)).is_some()); // 1 is now the least recently used
        c.insert(key(3), answer(4));
        assert_eq!(c.len(), 3);
        assert!(c.get(&key(1)).is_none());
        assert!(c.get(&key(0)).is_some() && c.get(&key(2)).is_some() && c.get(&key(3)).is_some());

        // Bytes: each answer of 100 values is 496 bytes; two fit in 1000.
        let mut c = ResultCache::new(100, 1000);
        c.insert(key(0), answer(100));
        c.insert(key(1), answer(100));
        c.insert(key(2), answer(100));
        assert_eq!((c.len(), c.bytes()), (2, 992));
        assert!(c.get(&key(0)).is_none());
        // Too big for the cache at all: not stored, nothing evicted.
        c.insert(key(9), answer(1000));
        assert_eq!(c.len(), 2);
        // Replacing an entry keeps the byte count exact.
        c.insert(key(1), answer(10));
        assert_eq!(c.bytes(), 496 + 136);
        let mut none = ResultCache::new(0, 1000);
        none.insert(key(0), answer(1));
        assert_eq!(none.len(), 0);
    }
}
