//! The verdicts: pure functions of what a drill recorded, so each can be tested on its own.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

/// One check and its evidence.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub name: &'static str,
    pub ok: bool,
    /// What was seen (always filled, so a passing check shows its numbers too).
    pub evidence: String,
}

impl Check {
    pub fn new(name: &'static str, ok: bool, evidence: impl Into<String>) -> Self {
        Check { name, ok, evidence: evidence.into() }
    }
}

/// The outcome of one drill with one seed.
#[derive(Debug, Clone, Serialize)]
pub struct DrillReport {
    pub drill: &'static str,
    pub seed: u64,
    pub nodes: usize,
    pub passed: bool,
    pub checks: Vec<Check>,
    /// Fault → the cluster acknowledges a write issued after the fault (ms).
    pub recovery_serving_ms: Option<f64>,
    /// Fault → the job finished (ms), for drills that run a job.
    pub recovery_job_ms: Option<f64>,
    /// Submit acknowledged → the job finished (ms), for drills that run a job: compare it with
    /// the same job undisturbed (`quiver bench job`).
    pub job_total_ms: Option<f64>,
    /// Writes acknowledged during the drill.
    pub acknowledged_writes: usize,
    pub duration_ms: f64,
    /// Agent log tails when the drill failed.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub logs: String,
}

/// At most one leader per term, from every node's `leaders.log` (lines `TERM LEADER UNIX_MS`).
/// `logs` pairs a node name with its file's text.
pub fn one_leader_per_term(logs: &[(String, String)]) -> Check {
    let mut by_term: BTreeMap<u64, BTreeSet<u64>> = BTreeMap::new();
    let mut bad_lines = Vec::new();
    for (node, text) in logs {
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let mut it = line.split_whitespace().map(str::parse::<u64>);
            match (it.next(), it.next()) {
                (Some(Ok(term)), Some(Ok(leader))) => {
                    by_term.entry(term).or_default().insert(leader);
                }
                // A crash can cut the last line short; anything else is evidence of a bug.
                _ => bad_lines.push(format!("{node}: {line:?}")),
            }
        }
    }
    let split: Vec<String> =
        by_term.iter().filter(|(_, l)| l.len() > 1).map(|(t, l)| format!("term {t}: leaders {l:?}")).collect();
    let terms = by_term.len();
    if by_term.is_empty() {
        return Check::new("one_leader_per_term", false, "no node recorded any leader");
    }
    Check::new(
        "one_leader_per_term",
        split.is_empty(),
        if split.is_empty() {
            format!("{terms} terms with a leader, one leader each{}", ignored(&bad_lines))
        } else {
            format!("split brain: {}{}", split.join("; "), ignored(&bad_lines))
        },
    )
}

fn ignored(lines: &[String]) -> String {
    if lines.is_empty() { String::new() } else { format!(" (unparsed lines: {})", lines.join(", ")) }
}

/// Every acknowledged write (`seq` → job id) is listed exactly once, under the id it was
/// acknowledged with; `listed` is (client_seq, job id) for every job of this drill's client.
pub fn acknowledged_exactly_once(acked: &BTreeMap<u64, u64>, listed: &[(u64, u64)]) -> Check {
    let mut seen: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
    for &(seq, id) in listed {
        seen.entry(seq).or_default().push(id);
    }
    let mut problems = Vec::new();
    for (&seq, &id) in acked {
        match seen.get(&seq).map(Vec::as_slice) {
            None => problems.push(format!("write {seq} (job {id}) acknowledged but lost")),
            Some([only]) if *only == id => {}
            Some([only]) => problems.push(format!("write {seq} acknowledged as job {id} but listed as job {only}")),
            Some(many) => problems.push(format!("write {seq} recorded {} times: jobs {many:?}", many.len())),
        }
    }
    for (seq, ids) in &seen {
        if ids.len() > 1 && !acked.contains_key(seq) {
            problems.push(format!("unacknowledged write {seq} recorded {} times: jobs {ids:?}", ids.len()));
        }
    }
    let ids: BTreeSet<u64> = acked.values().copied().collect();
    if ids.len() != acked.len() {
        problems.push("two acknowledged writes were given the same job id".into());
    }
    Check::new(
        "acknowledged_writes_exactly_once",
        problems.is_empty(),
        if problems.is_empty() {
            format!("{} acknowledged, all listed once ({} listed)", acked.len(), listed.len())
        } else {
            problems.join("; ")
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn logs(v: &[(&str, &str)]) -> Vec<(String, String)> {
        v.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect()
    }

    #[test]
    fn leaders_agreeing_per_term_pass_and_two_in_one_term_fail() {
        let ok = logs(&[("n1", "2 1 10\n3 2 20\n"), ("n2", "2 1 11\n3 2 21\n"), ("n3", "3 2 22\n")]);
        assert!(one_leader_per_term(&ok).ok);
        let split = logs(&[("n1", "2 1 10\n"), ("n2", "2 2 11\n")]);
        let c = one_leader_per_term(&split);
        assert!(!c.ok && c.evidence.contains("term 2"), "{c:?}");
        assert!(!one_leader_per_term(&logs(&[("n1", "")])).ok, "no record at all is not a pass");
        let torn = logs(&[("n1", "2 1 10\n3")]);
        assert!(one_leader_per_term(&torn).ok, "a torn last line is reported, not fatal");
    }

    #[test]
    fn lost_duplicated_and_renamed_writes_are_caught() {
        let acked: BTreeMap<u64, u64> = [(1, 10), (2, 11)].into();
        assert!(acknowledged_exactly_once(&acked, &[(1, 10), (2, 11), (3, 12)]).ok);
        let lost = acknowledged_exactly_once(&acked, &[(1, 10)]);
        assert!(!lost.ok && lost.evidence.contains("lost"), "{lost:?}");
        let dup = acknowledged_exactly_once(&acked, &[(1, 10), (2, 11), (2, 13)]);
        assert!(!dup.ok && dup.evidence.contains("2 times"), "{dup:?}");
        let renamed = acknowledged_exactly_once(&acked, &[(1, 10), (2, 14)]);
        assert!(!renamed.ok, "{renamed:?}");
        let unacked_dup = acknowledged_exactly_once(&acked, &[(1, 10), (2, 11), (5, 20), (5, 21)]);
        assert!(!unacked_dup.ok, "{unacked_dup:?}");
    }
}
