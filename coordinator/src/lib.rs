//! # quiver-coordinator — Raft, the replicated cluster state and the scheduler
//!
//! The coordinator is the cluster's memory and its scheduler: a sans-IO core around raft-rs's
//! `RawNode` that replicates membership and jobs, watches liveness, keeps the Raft configuration
//! healthy (autopilot) and decides which node runs which partition.
//!
//! What it is not: it opens no socket, reads no clock, spawns no thread and draws no unseeded
//! random number. The daemon's event loop owns the network and the disk and drives a
//! [`CoordinatorCore`] (the order it must follow is in the [`CoordinatorCore`] module docs); the
//! simulation in `quiver-tests` drives the same core on virtual time. This crate depends on no
//! other Quiver crate and never sees `proto`, tokio or quinn.
//!
//! ```
//! use std::time::Duration;
//! use quiver_coordinator::{bootstrap, CoordinatorCore, CoreConfig, LogStore, MemberInfo, MemStore};
//!
//! let me = MemberInfo { id: 1, peer_addr: "127.0.0.1:7400".into(), control_addr: "127.0.0.1:7401".into(),
//!                       cores: 2, memory_bytes: 1 << 30 };
//! let store = MemStore::new();
//! bootstrap(&store, &[me]).unwrap();
//! let logger = slog::Logger::root(slog::Discard, slog::o!());
//! let mut core = CoordinatorCore::open(CoreConfig::new(1), store.clone(), &logger).unwrap();
//! let mut now = Duration::ZERO;
//! while !core.is_leader() {
//!     now += Duration::from_millis(20);
//!     core.tick(now);
//!     while let Some(fx) = core.ready() {
//!         // A real driver sends fx.messages, persists, then sends fx.messages_after_persist.
//!         store.persist(&fx.persist).unwrap();
//!         core.persisted(fx.ticket);
//!     }
//! }
//! ```
//!
//! ## Contents, in reading order
//!
//! - [`state`]: the replicated state machine (members, jobs, serving capacity) and its commands.
//! - [`CoordinatorCore`] (module `core`): Raft, apply, liveness, autopilot; inputs and [`Effects`].
//! - [`storage`]: the `Persist` batch and the two stores, [`MemStore`] and [`DiskStore`]
//!   (raft-engine; why it and not redb is in its docs).
//! - [`scheduler`]: the cost model and load balancer (pure functions).
//! - `codec`: how commands and snapshots are encoded (postcard behind a versioned header).
//! - [`DetRng`]: the seeded RNG used for every random choice.

mod codec;
mod core;
pub mod failpoints;
mod rng;
pub mod scheduler;
pub mod state;
pub mod storage;

pub use crate::codec::{DecodeError, decode_command, decode_state, encode_command, encode_state};
pub use crate::core::{
    Applied, BootstrapError, ConfApplied, CoordinatorCore, CoreConfig, CoreStatus, Effects, LeaderHint, OpenError,
    Outbound, ProposeError, StepError, bootstrap, bootstrap_snapshot, voter_target,
};
pub use crate::rng::DetRng;
pub use crate::state::{ClusterState, Command, JobId, MemberInfo, NodeId, Op, Outcome, RequestId};
pub use crate::storage::{DiskStore, DiskStoreConfig, LogStore, MemStore, Persist, StoreError};

/// raft-rs, re-exported so drivers and tests use the exact version the core was built with.
pub use raft;
