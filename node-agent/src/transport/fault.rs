//! A fault-injecting UDP socket under quinn, for the chaos drills (`quiver chaos`).
//!
//! [`NetFaults`] is the control handle: the drill driver replaces its [`FaultRules`] at run time
//! (the agent exposes `POST /chaos/net` with `--fault-injection`). [`NetFaults::wrap`] puts a
//! [`FaultySocket`] around the socket quinn's runtime made; the endpoint is then built with
//! `quinn::Endpoint::new_with_abstract_socket`.
//!
//! What it can do, per datagram and seeded (the same seed and the same traffic give the same
//! decisions):
//! - egress (datagrams this node sends): drop, delay with jitter, duplicate, reorder (hold one
//!   datagram back so later ones overtake it), partition (drop everything to chosen addresses);
//! - ingress (datagrams this node receives): drop, partition (drop everything from chosen
//!   addresses). Delay and reordering are applied on the sending side only; with every node
//!   wrapped that covers every link.
//!
//! The per-datagram decisions ([`FaultRules::egress`], [`FaultRules::ingress`]) are a plain
//! function of the rules and the random stream; the socket only carries them out. Delayed
//! datagrams wait in one delay line (a task owning a heap ordered by due time, then arrival), so
//! equal delays keep their order.
//!
//! This module must not be used unless the operator asked for fault injection: the agent wraps
//! its socket only with `--fault-injection`, so the normal path keeps quinn's own socket (and its
//! UDP segmentation offload) untouched. With the flag and no rules set, transmits pass through
//! whole, segmentation offload included.

use std::cmp::Reverse;
use std::collections::{BTreeSet, BinaryHeap};
use std::fmt;
use std::io::{self, IoSliceMut};
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use quinn::udp::{EcnCodepoint, RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, UdpPoller};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio::time::Instant;

/// The largest delay, jitter or reorder hold the rules accept.
pub const MAX_DELAY: Duration = Duration::from_secs(10);
/// Datagrams waiting in the delay line before new delayed ones are dropped instead.
pub const MAX_DELAYED: u64 = 100_000;

/// What to do to this node's datagrams. `Default` is no fault at all.
///
/// JSON (`POST /chaos/net`): `{"drop": 0.1, "delay_ms": 20, "jitter_ms": 5, "duplicate": 0.01,
/// "reorder": 0.01, "ingress_drop": 0.0, "partition": ["127.0.0.1:7400"], "partition_in": [],
/// "partition_out": [], "seed": 7}`; every field is optional, and each request replaces all rules.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FaultRules {
    /// Probability that a sent datagram is dropped.
    pub drop: f64,
    /// Added to every sent datagram's departure.
    pub delay_ms: u64,
    /// A uniformly random extra delay in `[0, jitter_ms]` per sent datagram.
    pub jitter_ms: u64,
    /// Probability that a sent datagram is sent twice.
    pub duplicate: f64,
    /// Probability that a sent datagram is held back (by up to `max(delay_ms, 4) + 1` ms more)
    /// so that later datagrams overtake it.
    pub reorder: f64,
    /// Probability that a received datagram is dropped.
    pub ingress_drop: f64,
    /// Peer addresses cut off in both directions.
    pub partition: BTreeSet<SocketAddr>,
    /// Peer addresses whose datagrams to this node are dropped.
    pub partition_in: BTreeSet<SocketAddr>,
    /// Peer addresses this node's datagrams to are dropped.
    pub partition_out: BTreeSet<SocketAddr>,
    /// Reseeds the random stream when given (otherwise it continues).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
}

/// Rules that do not make sense; names the field and the reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct RulesError {
    pub field: &'static str,
    pub reason: String,
}

/// The fate of one sent datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Egress {
    /// Never sent.
    Drop,
    /// Sent `copies` times (1 or 2), after `delay` (zero: at once).
    Send { copies: u8, delay: Duration },
}

impl FaultRules {
    /// Checks probabilities and delays.
    pub fn validate(&self) -> Result<(), RulesError> {
        for (field, p) in [
            ("drop", self.drop),
            ("duplicate", self.duplicate),
            ("reorder", self.reorder),
            ("ingress_drop", self.ingress_drop),
        ] {
            if !(0.0..=1.0).contains(&p) {
                return Err(RulesError { field, reason: format!("{p} is not a probability in [0, 1]") });
            }
        }
        for (field, ms) in [("delay_ms", self.delay_ms), ("jitter_ms", self.jitter_ms)] {
            if Duration::from_millis(ms) > MAX_DELAY {
                return Err(RulesError { field, reason: format!("{ms} ms is above the {MAX_DELAY:?} limit") });
            }
        }
        Ok(())
    }

    /// Whether any rule touches sent datagrams.
    pub fn egress_active(&self) -> bool {
        self.drop > 0.0
            || self.delay_ms > 0
            || self.jitter_ms > 0
            || self.duplicate > 0.0
            || self.reorder > 0.0
            || !self.partition.is_empty()
            || !self.partition_out.is_empty()
    }

    /// Whether any rule touches received datagrams.
    pub fn ingress_active(&self) -> bool {
        self.ingress_drop > 0.0 || !self.partition.is_empty() || !self.partition_in.is_empty()
    }

    /// Decides the fate of one datagram sent to `to`.
    pub fn egress(&self, rng: &mut SplitMix64, to: SocketAddr) -> Egress {
        let to = canonical(to);
        if self.partition.contains(&to) || self.partition_out.contains(&to) {
            return Egress::Drop;
        }
        if self.drop > 0.0 && rng.chance(self.drop) {
            return Egress::Drop;
        }
        let mut delay = Duration::from_millis(self.delay_ms);
        if self.jitter_ms > 0 {
            delay += Duration::from_micros(rng.below(self.jitter_ms * 1000 + 1));
        }
        if self.reorder > 0.0 && rng.chance(self.reorder) {
            let hold_ms = self.delay_ms.max(4) + 1;
            delay += Duration::from_micros(1000 + rng.below(hold_ms * 1000));
        }
        let copies = if self.duplicate > 0.0 && rng.chance(self.duplicate) { 2 } else { 1 };
        Egress::Send { copies, delay }
    }

    /// Whether a datagram received from `from` is kept.
    pub fn ingress(&self, rng: &mut SplitMix64, from: SocketAddr) -> bool {
        let from = canonical(from);
        if self.partition.contains(&from) || self.partition_in.contains(&from) {
            return false;
        }
        !(self.ingress_drop > 0.0 && rng.chance(self.ingress_drop))
    }
}

/// IPv4-mapped IPv6 addresses compare as the IPv4 address they carry.
fn canonical(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(a.ip().to_canonical(), a.port())
}

/// A small seeded random stream (SplitMix64): stable across versions of any crate.
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// True with probability `p`.
    pub fn chance(&mut self, p: f64) -> bool {
        ((self.next_u64() >> 11) as f64 / (1u64 << 53) as f64) < p
    }

    /// Uniform in `[0, n)` (0 when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 { 0 } else { ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64 }
    }
}

/// What the socket has done so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct FaultStats {
    pub sent: u64,
    pub dropped: u64,
    pub delayed: u64,
    pub duplicated: u64,
    pub received: u64,
    pub dropped_in: u64,
}

#[derive(Default)]
struct Counters {
    sent: AtomicU64,
    dropped: AtomicU64,
    delayed: AtomicU64,
    duplicated: AtomicU64,
    received: AtomicU64,
    dropped_in: AtomicU64,
    waiting: AtomicU64,
}

struct State {
    rules: FaultRules,
    rng: SplitMix64,
}

/// The control handle: cheap to clone, shared by the socket and whoever steers it.
#[derive(Clone)]
pub struct NetFaults {
    state: Arc<Mutex<State>>,
    counters: Arc<Counters>,
}

impl fmt::Debug for NetFaults {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NetFaults").field("rules", &self.rules()).finish_non_exhaustive()
    }
}

impl NetFaults {
    /// No faults yet; decisions will draw from a stream seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        NetFaults {
            state: Arc::new(Mutex::new(State { rules: FaultRules::default(), rng: SplitMix64::new(seed) })),
            counters: Arc::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Replaces every rule (after validating them).
    pub fn set(&self, rules: FaultRules) -> Result<(), RulesError> {
        rules.validate()?;
        let mut s = self.lock();
        if let Some(seed) = rules.seed {
            s.rng = SplitMix64::new(seed);
        }
        s.rules = rules;
        Ok(())
    }

    /// The rules in force.
    pub fn rules(&self) -> FaultRules {
        self.lock().rules.clone()
    }

    /// Counters since start.
    pub fn stats(&self) -> FaultStats {
        let c = &self.counters;
        FaultStats {
            sent: c.sent.load(Ordering::Relaxed),
            dropped: c.dropped.load(Ordering::Relaxed),
            delayed: c.delayed.load(Ordering::Relaxed),
            duplicated: c.duplicated.load(Ordering::Relaxed),
            received: c.received.load(Ordering::Relaxed),
            dropped_in: c.dropped_in.load(Ordering::Relaxed),
        }
    }

    /// Wraps quinn's socket. Must be called inside a tokio runtime (the delay line is a task,
    /// which ends when the returned socket is dropped).
    pub fn wrap(&self, inner: Arc<dyn AsyncUdpSocket>) -> Arc<dyn AsyncUdpSocket> {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(delay_line(inner.clone(), rx, self.counters.clone()));
        Arc::new(FaultySocket { inner, faults: self.clone(), delayed: tx })
    }
}

/// One datagram waiting in the delay line.
struct Delayed {
    due: Instant,
    seq: u64,
    destination: SocketAddr,
    ecn: Option<EcnCodepoint>,
    src_ip: Option<IpAddr>,
    bytes: Vec<u8>,
}

impl PartialEq for Delayed {
    fn eq(&self, o: &Self) -> bool {
        (self.due, self.seq) == (o.due, o.seq)
    }
}
impl Eq for Delayed {}
impl PartialOrd for Delayed {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Delayed {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (self.due, self.seq).cmp(&(o.due, o.seq))
    }
}

/// Sends delayed datagrams when they are due, in (due, arrival) order. A datagram the socket
/// will not take even after waiting for writability is lost, as UDP may lose it.
async fn delay_line(inner: Arc<dyn AsyncUdpSocket>, mut rx: mpsc::UnboundedReceiver<Delayed>, c: Arc<Counters>) {
    let mut heap: BinaryHeap<Reverse<Delayed>> = BinaryHeap::new();
    let mut poller = inner.clone().create_io_poller();
    loop {
        let next_due = heap.peek().map(|Reverse(d)| d.due);
        tokio::select! {
            got = rx.recv() => match got {
                Some(d) => heap.push(Reverse(d)),
                None if heap.is_empty() => return,
                None => {}
            },
            () = sleep_until_opt(next_due) => {
                while heap.peek().is_some_and(|Reverse(d)| d.due <= Instant::now()) {
                    let Some(Reverse(d)) = heap.pop() else { break };
                    c.waiting.fetch_sub(1, Ordering::Relaxed);
                    let t = Transmit {
                        destination: d.destination,
                        ecn: d.ecn,
                        contents: &d.bytes,
                        segment_size: None,
                        src_ip: d.src_ip,
                    };
                    for _ in 0..3 {
                        match inner.try_send(&t) {
                            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                                let _ = std::future::poll_fn(|cx| poller.as_mut().poll_writable(cx)).await;
                            }
                            _ => break,
                        }
                    }
                }
            }
        }
        if rx.is_closed() && heap.is_empty() {
            return;
        }
    }
}

async fn sleep_until_opt(due: Option<Instant>) {
    match due {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// quinn's socket with [`NetFaults`] applied to every datagram.
pub struct FaultySocket {
    inner: Arc<dyn AsyncUdpSocket>,
    faults: NetFaults,
    delayed: mpsc::UnboundedSender<Delayed>,
}

impl fmt::Debug for FaultySocket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FaultySocket").field("inner", &self.inner).field("faults", &self.faults).finish()
    }
}

impl FaultySocket {
    /// Sends one datagram (no segmentation) according to the rules; `first` says whether a
    /// `WouldBlock` may still be reported to quinn (nothing of this transmit has left yet).
    fn send_one(
        &self,
        t: &Transmit,
        contents: &[u8],
        rules: &FaultRules,
        rng: &mut SplitMix64,
        first: bool,
    ) -> io::Result<()> {
        let c = &self.faults.counters;
        match rules.egress(rng, t.destination) {
            Egress::Drop => {
                c.dropped.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Egress::Send { copies, delay } if delay.is_zero() => {
                let one = Transmit { contents, segment_size: None, ..*t };
                match self.inner.try_send(&one) {
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock && first => return Err(e),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        c.dropped.fetch_add(1, Ordering::Relaxed);
                        return Ok(());
                    }
                    other => other?,
                }
                c.sent.fetch_add(1, Ordering::Relaxed);
                if copies > 1 && self.inner.try_send(&one).is_ok() {
                    c.duplicated.fetch_add(1, Ordering::Relaxed);
                }
                Ok(())
            }
            Egress::Send { copies, delay } => {
                let due = Instant::now() + delay;
                for i in 0..copies {
                    if c.waiting.load(Ordering::Relaxed) >= MAX_DELAYED {
                        c.dropped.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    c.waiting.fetch_add(1, Ordering::Relaxed);
                    let d = Delayed {
                        due,
                        seq: c.delayed.fetch_add(1, Ordering::Relaxed),
                        destination: t.destination,
                        ecn: t.ecn,
                        src_ip: t.src_ip,
                        bytes: contents.to_vec(),
                    };
                    if self.delayed.send(d).is_err() {
                        c.waiting.fetch_sub(1, Ordering::Relaxed);
                    } else if i == 0 {
                        c.sent.fetch_add(1, Ordering::Relaxed);
                    } else {
                        c.duplicated.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Ok(())
            }
        }
    }
}

impl AsyncUdpSocket for FaultySocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        self.inner.clone().create_io_poller()
    }

    fn try_send(&self, t: &Transmit) -> io::Result<()> {
        let mut s = self.faults.lock();
        let State { rules, rng } = &mut *s;
        if !rules.egress_active() {
            drop(s);
            let r = self.inner.try_send(t);
            if r.is_ok() {
                let n = t.segment_size.map_or(1, |seg| t.contents.len().div_ceil(seg.max(1)));
                self.faults.counters.sent.fetch_add(n as u64, Ordering::Relaxed);
            }
            return r;
        }
        // Segmentation offload packs several datagrams into one transmit; each gets its own fate.
        let seg = t.segment_size.unwrap_or(t.contents.len()).max(1);
        for (i, chunk) in t.contents.chunks(seg).enumerate() {
            self.send_one(t, chunk, rules, rng, i == 0)?;
        }
        Ok(())
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        loop {
            let n = match self.inner.poll_recv(cx, bufs, meta) {
                Poll::Ready(Ok(n)) => n,
                other => return other,
            };
            let c = &self.faults.counters;
            c.received.fetch_add(n as u64, Ordering::Relaxed);
            let mut s = self.faults.lock();
            let State { rules, rng } = &mut *s;
            if !rules.ingress_active() {
                return Poll::Ready(Ok(n));
            }
            // A buffer may hold several datagrams from one sender (receive offload); it is kept or
            // dropped whole.
            let kept = compact(&mut bufs[..n], &mut meta[..n], |m| rules.ingress(rng, m.addr));
            c.dropped_in.fetch_add((n - kept) as u64, Ordering::Relaxed);
            if kept > 0 {
                return Poll::Ready(Ok(kept));
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        self.inner.max_transmit_segments()
    }

    fn max_receive_segments(&self) -> usize {
        self.inner.max_receive_segments()
    }

    fn may_fragment(&self) -> bool {
        self.inner.may_fragment()
    }
}

/// Moves the received buffers `keep` accepts to the front, in order; returns how many.
fn compact(bufs: &mut [IoSliceMut<'_>], meta: &mut [RecvMeta], mut keep: impl FnMut(&RecvMeta) -> bool) -> usize {
    let mut j = 0;
    for i in 0..meta.len() {
        if !keep(&meta[i]) {
            continue;
        }
        if j != i {
            let len = meta[i].len;
            let (front, back) = bufs.split_at_mut(i);
            if len > front[j].len() {
                continue;
            }
            front[j][..len].copy_from_slice(&back[0][..len]);
            meta[j] = meta[i];
        }
        j += 1;
    }
    j
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    #[test]
    fn no_rules_touch_nothing() {
        let r = FaultRules::default();
        assert!(!r.egress_active() && !r.ingress_active());
        let mut rng = SplitMix64::new(1);
        for _ in 0..1000 {
            assert_eq!(r.egress(&mut rng, addr(1)), Egress::Send { copies: 1, delay: Duration::ZERO });
            assert!(r.ingress(&mut rng, addr(1)));
        }
    }

    #[test]
    fn the_same_seed_gives_the_same_fates() {
        let r = FaultRules { drop: 0.3, jitter_ms: 5, duplicate: 0.2, reorder: 0.1, ..Default::default() };
        let run = |seed| {
            let mut rng = SplitMix64::new(seed);
            (0..500).map(|_| r.egress(&mut rng, addr(9))).collect::<Vec<_>>()
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
    }

    #[test]
    fn drop_duplicate_and_delay_rates_follow_the_rules() {
        let r = FaultRules { drop: 0.1, delay_ms: 20, jitter_ms: 4, duplicate: 0.05, ..Default::default() };
        let mut rng = SplitMix64::new(42);
        let n = 100_000;
        let (mut dropped, mut dup) = (0, 0);
        for _ in 0..n {
            match r.egress(&mut rng, addr(5)) {
                Egress::Drop => dropped += 1,
                Egress::Send { copies, delay } => {
                    assert!(delay >= Duration::from_millis(20) && delay <= Duration::from_millis(24), "{delay:?}");
                    dup += usize::from(copies == 2);
                }
            }
        }
        let rate = |k: usize, of: usize| k as f64 / of as f64;
        assert!((rate(dropped, n) - 0.1).abs() < 0.01, "drop rate {}", rate(dropped, n));
        assert!((rate(dup, n - dropped) - 0.05).abs() < 0.01, "duplicate rate {}", rate(dup, n - dropped));
    }

    #[test]
    fn reordered_datagrams_are_held_past_the_plain_delay() {
        let r = FaultRules { delay_ms: 2, reorder: 1.0, ..Default::default() };
        let mut rng = SplitMix64::new(3);
        for _ in 0..1000 {
            let Egress::Send { delay, .. } = r.egress(&mut rng, addr(5)) else { panic!("dropped") };
            assert!(delay > Duration::from_millis(3) && delay <= Duration::from_millis(8), "{delay:?}");
        }
    }

    #[test]
    fn partitions_are_per_direction_and_per_address() {
        let mut rng = SplitMix64::new(1);
        let both = FaultRules { partition: [addr(1)].into(), ..Default::default() };
        assert_eq!(both.egress(&mut rng, addr(1)), Egress::Drop);
        assert!(!both.ingress(&mut rng, addr(1)));
        assert!(both.ingress(&mut rng, addr(2)));
        let v6 = SocketAddr::new("::ffff:127.0.0.1".parse().unwrap(), 1);
        assert_eq!(both.egress(&mut rng, v6), Egress::Drop, "an IPv4-mapped address is the same peer");
        let out = FaultRules { partition_out: [addr(1)].into(), ..Default::default() };
        assert_eq!(out.egress(&mut rng, addr(1)), Egress::Drop);
        assert!(out.ingress(&mut rng, addr(1)));
        let inn = FaultRules { partition_in: [addr(1)].into(), ..Default::default() };
        assert_ne!(inn.egress(&mut rng, addr(1)), Egress::Drop);
        assert!(!inn.ingress(&mut rng, addr(1)));
    }

    #[test]
    fn rules_parse_from_json_and_bad_values_are_named() {
        let r: FaultRules =
            serde_json::from_str(r#"{"drop":0.1,"delay_ms":20,"partition":["127.0.0.1:7400"],"seed":5}"#).unwrap();
        assert_eq!(r.partition.len(), 1);
        assert_eq!(r.seed, Some(5));
        let e = FaultRules { drop: 1.5, ..Default::default() }.validate().unwrap_err();
        assert_eq!(e.field, "drop");
        let e = FaultRules { delay_ms: 60_000, ..Default::default() }.validate().unwrap_err();
        assert_eq!(e.field, "delay_ms");
        assert!(serde_json::from_str::<FaultRules>(r#"{"dorp":0.1}"#).is_err(), "unknown fields are refused");
    }

    #[test]
    fn compaction_keeps_accepted_buffers_in_order() {
        let mut storage = [[0u8; 4]; 4];
        for (i, s) in storage.iter_mut().enumerate() {
            s.fill(i as u8 + 1);
        }
        let [a, b, c, d] = &mut storage;
        let mut bufs = [IoSliceMut::new(a), IoSliceMut::new(b), IoSliceMut::new(c), IoSliceMut::new(d)];
        let mut meta = [RecvMeta::default(); 4];
        for (i, m) in meta.iter_mut().enumerate() {
            m.addr = addr(i as u16);
            m.len = 4;
            m.stride = 4;
        }
        let kept = compact(&mut bufs, &mut meta, |m| m.addr.port() % 2 == 1);
        assert_eq!(kept, 2);
        assert_eq!((meta[0].addr.port(), meta[1].addr.port()), (1, 3));
        assert_eq!((&bufs[0][..], &bufs[1][..]), (&[2u8; 4][..], &[4u8; 4][..]));
    }

    /// End to end over real loopback sockets: a wrapped socket under a partition sends nothing to
    /// the cut-off address, and with the rules cleared delivers again; delayed datagrams arrive.
    #[tokio::test]
    async fn a_wrapped_socket_drops_and_delays_real_datagrams() {
        let runtime = quinn::default_runtime().unwrap();
        let rx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        rx.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let to = rx.local_addr().unwrap();
        let faults = NetFaults::new(1);
        let sock = faults.wrap(runtime.wrap_udp_socket(std::net::UdpSocket::bind("127.0.0.1:0").unwrap()).unwrap());
        let send = |b: &[u8]| {
            let t = Transmit { destination: to, ecn: None, contents: b, segment_size: None, src_ip: None };
            sock.try_send(&t).unwrap();
        };
        faults.set(FaultRules { partition: [to].into(), ..Default::default() }).unwrap();
        send(b"cut");
        faults.set(FaultRules { delay_ms: 30, ..Default::default() }).unwrap();
        let t0 = std::time::Instant::now();
        send(b"late");
        let rx = tokio::task::spawn_blocking(move || {
            let mut buf = [0u8; 16];
            let n = rx.recv(&mut buf).unwrap();
            buf[..n].to_vec()
        });
        assert_eq!(rx.await.unwrap(), b"late", "the partitioned datagram never arrives");
        assert!(t0.elapsed() >= Duration::from_millis(30), "{:?}", t0.elapsed());
        let s = faults.stats();
        assert_eq!((s.dropped, s.delayed), (1, 1), "{s:?}");
    }
}
