//! Seeded simulations of 3- and 5-node coordinator clusters under message loss, delay,
//! duplication, partitions, leader isolation and crashes. Every seed checks the invariants listed
//! in `quiver_tests::raft_sim`; a failure names the seed, which replays exactly.

use std::time::Duration;

use quiver_tests::raft_sim::{NetFaults, SimCluster, failover_time};

/// Seeds per scenario in a normal `cargo test` run; `QUIVER_SIM_SEEDS` overrides.
fn seeds() -> u64 {
    std::env::var("QUIVER_SIM_SEEDS").ok().and_then(|s| s.parse().ok()).unwrap_or(500)
}

/// Runs `scenario` for every seed, collecting failures with their seed.
fn for_seeds(name: &str, scenario: impl Fn(u64) -> Result<(), String>) {
    let failures: Vec<String> =
        (0..seeds()).filter_map(|seed| scenario(seed).err().map(|e| format!("seed {seed}: {e}"))).collect();
    assert!(failures.is_empty(), "{name}: {} of {} seeds failed:\n{}", failures.len(), seeds(), failures.join("\n"));
}

/// Random faults for a few virtual seconds, then heal, restart everyone and check convergence.
fn chaos(nodes: usize, seed: u64) -> Result<(), String> {
    let mut sim = SimCluster::new(nodes, 2, seed, NetFaults::lossy());
    let ids = sim.ids();
    let minority = (nodes - 1) / 2;
    for _ in 0..8 {
        match sim.random(6) {
            0 => {
                let down = ids.iter().filter(|&&id| !sim.is_up(id)).count();
                if down < minority {
                    let victim = ids[sim.random(nodes as u64) as usize];
                    sim.crash(victim);
                }
            }
            1 => ids.iter().for_each(|&id| sim.restart(id)),
            2 => {
                if let Some(leader) = sim.leader() {
                    sim.isolate(leader);
                }
            }
            3 => {
                let split = 1 + sim.random(minority as u64) as usize;
                let (a, b) = ids.split_at(split);
                sim.partition(a, b);
            }
            _ => sim.heal(),
        }
        sim.run_for(Duration::from_millis(400));
        if let Some(v) = sim.violations().first() {
            return Err(v.clone());
        }
    }
    sim.heal();
    ids.iter().for_each(|&id| sim.restart(id));
    sim.settle_and_check(Duration::from_secs(15))?;
    if sim.acknowledged() == 0 {
        return Err("no request was acknowledged in the whole run".into());
    }
    Ok(())
}

#[test]
fn three_nodes_survive_loss_partitions_and_crashes() {
    for_seeds("3-node chaos", |seed| chaos(3, seed));
}

#[test]
fn five_nodes_survive_loss_partitions_and_crashes() {
    for_seeds("5-node chaos", |seed| chaos(5, seed));
}

/// The leader is cut off: the majority elects a new leader, the old one steps down (check-quorum)
/// and, once healed, catches up without disturbing the new term (pre-vote).
#[test]
fn isolated_leader_is_replaced_and_rejoins() {
    for_seeds("leader isolation", |seed| {
        let mut sim = SimCluster::new(3, 1, seed, NetFaults::lan());
        if !sim.run_until(Duration::from_secs(3), |s| s.leader().is_some()) {
            return Err("no first leader".into());
        }
        sim.run_for(Duration::from_millis(300));
        let old = sim.leader().ok_or("leader vanished")?;
        sim.isolate(old);
        let replaced = sim.run_until(sim.now() + Duration::from_secs(3), |s| {
            s.leader().is_some_and(|l| l != old) && s.core(old).is_some_and(|c| !c.is_leader())
        });
        if !replaced {
            return Err("isolated leader was not replaced, or did not step down".into());
        }
        let new = sim.leader().ok_or("no new leader")?;
        let term = sim.term_of(new).ok_or("new leader down")?;
        sim.heal();
        sim.settle_and_check(Duration::from_secs(10))?;
        if sim.term_of(new) != Some(term) || sim.leader() != Some(new) {
            return Err(format!("the healed old leader disturbed term {term} of node {new}"));
        }
        Ok(())
    })
}

/// With the real-time settings (20 ms ticks, 200–400 ms election timeout) a crashed leader is
/// replaced within 300 ms in the median and 600 ms at worst. Virtual time, so deterministic.
#[test]
fn leader_failover_meets_latency_targets() {
    let mut times: Vec<Duration> = Vec::new();
    for seed in 0..seeds() {
        match failover_time(seed) {
            Some(t) => times.push(t),
            None => panic!("seed {seed}: no new leader within 5 s of the leader's crash"),
        }
    }
    times.sort();
    let median = times[times.len() / 2];
    let worst = times[times.len() - 1];
    assert!(median <= Duration::from_millis(300), "median failover {median:?} over {} seeds", times.len());
    assert!(worst <= Duration::from_millis(600), "worst failover {worst:?} over {} seeds", times.len());
}

#[test]
fn same_seed_same_history() {
    let run = |seed| {
        let mut sim = SimCluster::new(3, 2, seed, NetFaults::lossy());
        sim.run_for(Duration::from_secs(2));
        sim.crash(1);
        sim.run_for(Duration::from_secs(1));
        sim.history()
    };
    for seed in [1, 2, 3] {
        let a = run(seed);
        assert!(!a.is_empty());
        assert_eq!(a, run(seed), "seed {seed} replayed differently");
    }
}

/// Seeds for the slower membership scenarios (many virtual seconds each).
fn membership_seeds() -> u64 {
    (seeds() / 10).max(10)
}

/// A dead voter is replaced by a healthy learner after the grace period (promote, then remove),
/// and comes back as a learner when it restarts.
#[test]
fn autopilot_replaces_a_dead_voter_with_a_learner() {
    for seed in 0..membership_seeds() {
        let mut sim = SimCluster::new(5, 1, seed, NetFaults::lan());
        let ok = sim.run_until(Duration::from_secs(3), |s| s.leader().is_some());
        assert!(ok, "seed {seed}: no leader");
        let voters = sim.core(sim.leader().unwrap()).unwrap().status().voters;
        assert_eq!(voters, vec![1, 2, 3], "seed {seed}: bootstrap-expect 5 starts with 3 voters");
        let victim = voters[(seed % 3) as usize];
        sim.crash(victim);
        let replaced = sim.run_until(sim.now() + Duration::from_secs(10), |s| {
            s.leader().and_then(|l| s.core(l)).is_some_and(|c| {
                let st = c.status();
                st.voters.len() == 3 && !st.voters.contains(&victim) && !st.learners.contains(&victim)
            })
        });
        assert!(
            replaced,
            "seed {seed}: dead voter {victim} was not replaced: {:?}",
            sim.leader().and_then(|l| sim.core(l)).map(|c| c.status())
        );
        let leader = sim.leader().unwrap();
        let down = sim.state_of(leader).unwrap().members[&victim].liveness;
        assert_eq!(down, quiver_coordinator::state::Liveness::Down, "seed {seed}");
        sim.restart(victim);
        let back = sim.run_until(sim.now() + Duration::from_secs(10), |s| {
            s.leader().and_then(|l| s.core(l)).is_some_and(|c| c.status().learners.contains(&victim))
                && s.leader()
                    .and_then(|l| s.state_of(l))
                    .is_some_and(|st| st.members[&victim].liveness == quiver_coordinator::state::Liveness::Alive)
        });
        assert!(back, "seed {seed}: restarted node {victim} did not come back as a live learner");
        sim.settle_and_check(Duration::from_secs(10)).unwrap_or_else(|e| panic!("seed {seed}: {e}"));
    }
}

/// A new node joins through any member (followers answer with the leader's address and the
/// client follows it), receives the state, and becomes a learner; the voter set stays at 3.
#[test]
fn new_node_joins_through_any_member_as_a_learner() {
    for seed in 0..membership_seeds() {
        let mut sim = SimCluster::new(3, 1, seed, NetFaults::lossy());
        assert!(sim.run_until(Duration::from_secs(3), |s| s.leader().is_some()), "seed {seed}: no leader");
        sim.run_for(Duration::from_millis(500));
        let id = sim.add_node();
        let joined = sim.run_until(sim.now() + Duration::from_secs(10), |s| {
            s.leader().and_then(|l| s.core(l)).is_some_and(|c| c.status().learners.contains(&id))
                && s.core(id).is_some_and(|c| c.state().members.contains_key(&id))
        });
        assert!(joined, "seed {seed}: node {id} did not join as a learner");
        sim.settle_and_check(Duration::from_secs(10)).unwrap_or_else(|e| panic!("seed {seed}: {e}"));
        let status = sim.core(sim.leader().unwrap()).unwrap().status();
        assert_eq!(status.voters.len(), 3, "seed {seed}: {status:?}");
    }
}
