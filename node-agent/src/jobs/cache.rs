//! Partitions kept after their job, so that the next job on the same graph skips the cut, the
//! transfer and the pull plan's layout (built once per partition, kept with its graph).
//!
//! A partition is a function of the graph's content and the partition boundaries: the same
//! graph (by SHA-256) cut into the same number of partitions gives the same local graph, halo and
//! mirror lists, bit for bit. An owner therefore keeps each partition it computed to the end of a
//! *successful* job (a cancelled or failed job's partition is freed with it), keyed by
//! [`PartKey`], in a cache bounded in bytes that drops the least recently used partitions first.
//! The master of the next job asks each owner whether it holds its partition before cutting
//! anything (`JobPlan.graph_digest` → `partition_held`), and cuts and ships only when some owner
//! does not. Partitions that carry feature rows (APPNP with a features file) are never kept:
//! their rows belong to one job.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::wire::OwnedPart;

/// Bytes of partitions a node keeps by default (`quiver agent --partition-cache`): room for the
/// partitions of a graph of a few hundred million edges; larger partitions are not kept.
pub const DEFAULT_PARTITION_CACHE_BYTES: u64 = 1 << 30;

/// Which partition of which graph: the graph's SHA-256, the partition count and the index.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PartKey {
    pub graph: [u8; 32],
    pub partitions: u32,
    pub index: u32,
}

/// The kept partitions of one node, least recently used dropped first beyond the capacity.
#[derive(Debug)]
pub struct PartitionCache {
    inner: Mutex<Inner>,
    hits: AtomicU64,
    misses: AtomicU64,
}

#[derive(Debug, Default)]
struct Inner {
    capacity: u64,
    bytes: u64,
    /// Use counter: each get or insert stamps its entry with the next value.
    clock: u64,
    entries: HashMap<PartKey, Entry>,
}

impl Inner {
    /// Drops least recently used partitions until at most `bytes` are held.
    fn shrink_to(&mut self, bytes: u64) {
        while self.bytes > bytes {
            let Some(oldest) = self.entries.iter().min_by_key(|(_, e)| e.used).map(|(k, _)| *k) else { break };
            let gone = self.entries.remove(&oldest).expect("found above");
            self.bytes -= gone.bytes;
        }
    }
}

#[derive(Debug)]
struct Entry {
    part: Arc<OwnedPart>,
    bytes: u64,
    used: u64,
}

/// Bytes a partition holds: its arrays, lists, and the pull plan its jobs built.
pub fn part_bytes(p: &OwnedPart) -> u64 {
    let (offsets, sources, out_degree, in_degree) = p.graph.segments();
    let arrays = offsets.as_bytes().len() + sources.as_bytes().len() + out_degree.as_bytes().len();
    let lists = p.halo_sources.len() * 3 * 4 + p.mirrors.iter().map(|m| 16 + m.vertices.len() * 4).sum::<usize>();
    (arrays + in_degree.as_bytes().len() + lists + p.graph.pull_plan_bytes()) as u64
}

impl PartitionCache {
    /// An empty cache holding at most `capacity` bytes (0: keeps nothing).
    pub fn new(capacity: u64) -> Self {
        Self {
            inner: Mutex::new(Inner { capacity, ..Inner::default() }),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The partition `key` if held, marked as just used.
    pub fn get(&self, key: &PartKey) -> Option<Arc<OwnedPart>> {
        let mut inner = self.lock();
        inner.clock += 1;
        let now = inner.clock;
        let found = inner.entries.get_mut(key).map(|e| {
            e.used = now;
            e.part.clone()
        });
        if found.is_some() {
            self.hits.fetch_add(1, Ordering::Relaxed);
            metrics::counter!("quiver_job_partition_cache_hits_total").increment(1);
        } else {
            self.misses.fetch_add(1, Ordering::Relaxed);
            metrics::counter!("quiver_job_partition_cache_misses_total").increment(1);
        }
        found
    }

    /// Keeps `part` under `key`, dropping the least recently used partitions until it fits.
    /// A partition with feature rows, or larger than the whole capacity, is not kept.
    pub fn insert(&self, key: PartKey, part: Arc<OwnedPart>) {
        if part.features.is_some() || part.index != key.index {
            return;
        }
        let bytes = part_bytes(&part);
        let mut inner = self.lock();
        if bytes > inner.capacity {
            return;
        }
        if let Some(old) = inner.entries.remove(&key) {
            inner.bytes -= old.bytes;
        }
        let room = inner.capacity - bytes;
        inner.shrink_to(room);
        inner.clock += 1;
        let used = inner.clock;
        inner.entries.insert(key, Entry { part, bytes, used });
        inner.bytes += bytes;
        metrics::gauge!("quiver_job_partition_cache_bytes").set(inner.bytes as f64);
    }

    /// Changes the capacity, dropping least recently used partitions beyond it.
    pub fn set_capacity(&self, capacity: u64) {
        let mut inner = self.lock();
        inner.capacity = capacity;
        inner.shrink_to(capacity);
        metrics::gauge!("quiver_job_partition_cache_bytes").set(inner.bytes as f64);
    }

    /// Whether the cache keeps anything at all.
    pub fn enabled(&self) -> bool {
        self.lock().capacity > 0
    }

    /// Bytes held.
    pub fn bytes(&self) -> u64 {
        self.lock().bytes
    }

    /// Partitions held.
    pub fn len(&self) -> usize {
        self.lock().entries.len()
    }

    /// Lookups that found their partition, and lookups that did not, since the start.
    pub fn lookups(&self) -> (u64, u64) {
        (self.hits.load(Ordering::Relaxed), self.misses.load(Ordering::Relaxed))
    }

    /// Whether no partition is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use quiver_compute::{generate, partition};

    fn parts(scale: u32, count: usize) -> Vec<Arc<OwnedPart>> {
        let g = generate::kronecker(scale, 8, 3).expect("graph");
        let cut = partition::partition(&g, count).expect("cut");
        cut.parts.iter().map(|p| Arc::new(OwnedPart::from_partition(p, None))).collect()
    }

    fn key(index: u32) -> PartKey {
        PartKey { graph: [7; 32], partitions: 3, index }
    }

    #[test]
    fn keeps_within_capacity_dropping_the_least_recently_used() {
        let p = parts(10, 3);
        let each: Vec<u64> = p.iter().map(|x| part_bytes(x)).collect();
        let cache = PartitionCache::new(each[0] + each[1] + each[2] - 1);
        cache.insert(key(0), p[0].clone());
        cache.insert(key(1), p[1].clone());
        assert!(cache.get(&key(0)).is_some(), "0 is now the most recently used");
        cache.insert(key(2), p[2].clone());
        assert!(cache.get(&key(1)).is_none(), "1 was the least recently used");
        assert!(cache.get(&key(0)).is_some() && cache.get(&key(2)).is_some());
        assert_eq!(cache.bytes(), each[0] + each[2]);
        cache.set_capacity(0);
        assert!(cache.is_empty() && cache.bytes() == 0 && !cache.enabled());
        cache.insert(key(0), p[0].clone());
        assert!(cache.is_empty(), "a zero capacity keeps nothing");
    }

    #[test]
    fn refuses_feature_rows_and_a_mismatched_index() {
        let p = parts(8, 2);
        let cache = PartitionCache::new(1 << 30);
        let mut with = (*p[0]).clone();
        with.features = Some(quiver_compute::Segment::from_slice(&vec![0f32; with.graph.owned()]));
        cache.insert(key(0), Arc::new(with));
        cache.insert(key(0), p[1].clone());
        assert!(cache.is_empty());
        cache.insert(key(1), p[1].clone());
        assert_eq!(cache.len(), 1);
    }
}
