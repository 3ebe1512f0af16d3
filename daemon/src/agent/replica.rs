//! Second copies of a job's data: its input graph and its checkpoints live on two holders, so
//! a job outlives the loss of the node it was submitted to. The graph's copy is made with the
//! job's first checkpoint (not on the submit's path) and the new holder is recorded in Raft once
//! its copy is stored; checkpoints go to every holder recorded when they are taken.
//!
//! A copy travels on a `STREAM_KIND_REPLICA` stream as zero-copy frames of consecutive 2 MiB
//! pieces (`ReplicaMeta`: the file's place under the receiver's data directory, its SHA-256,
//! the piece's offset and the file's length; one segment: the piece), so neither end holds the
//! file in memory. The receiver checks the name, appends each piece in order to `NAME.N.part`
//! while hashing, checks the digest, syncs, renames it into place, then answers
//! `ErrorReply { code: 0 }`; any refusal names the file and the reason. Graphs
//! are content-addressed (`blobs/<sha256 hex>`, where uploads land too), so a copy of a graph is
//! the same file at the same place on every holder; checkpoints keep the layout the master
//! writes locally (`checkpoints/<job>/<superstep>/<file>`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use quiver_compute::Segment;
use quiver_coordinator::state::{Command, Liveness, Op, Outcome, RequestId};
use quiver_node_agent::transport::{InboundStream, NodeId, OutFrame, StreamError};
use quiver_proto::peer::{ErrorReply, ReplicaMeta, StreamHeader, StreamKind, frame_header};

use super::Shared;
use super::jobs::JobFiles;

/// How long one copy may take before the sender gives up on that holder: 2 s plus the time to
/// move its bytes at 50 MB/s (a node killed a moment ago still looks alive for about a second, and
/// a copy to it must not hold a submit up for the connection's whole idle timeout).
fn push_within(bytes: usize) -> Duration {
    Duration::from_secs(2) + Duration::from_secs_f64(bytes as f64 / 50e6)
}

/// Where a graph with this digest lives on any holder: `DATA_DIR/blobs/<sha256 hex>`.
pub fn graph_name(digest: &[u8; 32]) -> String {
    format!("blobs/{}", crate::run::hex(digest))
}

/// Whether `name` is a place a peer may write under our data directory: `blobs/<64 hex>` or
/// `checkpoints/<job>/<superstep>/<file>`, plain components only (no `..`, no absolute path).
fn check_name(name: &str) -> Result<(), String> {
    let parts: Vec<&str> = name.split('/').collect();
    let plain = |p: &str| {
        !p.is_empty()
            && p != "."
            && p != ".."
            && p.len() <= 64
            && p.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
    };
    let ok = match parts.as_slice() {
        ["blobs", hex] => hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()),
        ["checkpoints", job, step, file] => {
            job.parse::<u64>().is_ok() && step.parse::<u32>().is_ok() && plain(file) && !file.ends_with(".part")
        }
        _ => false,
    };
    if ok {
        Ok(())
    } else {
        Err(format!("{name:?} is not a replica name (blobs/<sha256> or checkpoints/JOB/STEP/FILE)"))
    }
}

/// Bytes per frame of a copy: a file travels in pieces, so neither end holds it in memory
/// (2 MiB: a piece stays alive until the receiver acknowledges its last byte, so the sender
/// holds about two, next to the stream's 4 MiB window).
const PIECE_BYTES: u64 = 2 << 20;

/// Largest file a peer may send (a sanity bound on `ReplicaMeta.total`).
const MAX_REPLICA_BYTES: u64 = 1 << 40;

/// Copies the file at `path` to `to`, stored there as `name`; returns once `to` has it on disk.
/// Sent in pieces of [`PIECE_BYTES`] with the file's SHA-256, which a blob's name already is (a
/// file changed since it was named fails the receiver's check); other files are hashed first.
pub async fn push(shared: &Shared, to: u64, name: &str, path: &Path) -> Result<()> {
    check_name(name).map_err(anyhow::Error::msg)?;
    fail::fail_point!(quiver_node_agent::failpoints::JOB_TRANSFER, |_| Err(anyhow::anyhow!(
        "{name} to node {to}: failpoint {}",
        quiver_node_agent::failpoints::JOB_TRANSFER
    )));
    // A blob is named by its SHA-256 (the receiver checks the bytes against it); anything else
    // is hashed here.
    let digest = match name.strip_prefix("blobs/").and_then(crate::run::digest_from_hex) {
        Some(d) => d,
        None => {
            let owned = path.to_path_buf();
            tokio::task::spawn_blocking(move || crate::run::sha256_file(&owned)).await?.map_err(anyhow::Error::msg)?
        }
    };
    let total = tokio::fs::metadata(path).await.with_context(|| format!("reading {}", path.display()))?.len();
    let within = push_within(total as usize);
    let send = async {
        let header = StreamHeader { kind: StreamKind::Replica as i32, ..Default::default() };
        let conn = shared.transport.connection(NodeId(to)).await?;
        let (mut send, mut recv) = conn.open_bi(header).await?;
        let mut file = std::fs::File::open(path).with_context(|| format!("reading {}", path.display()))?;
        for offset in (0..total).step_by(PIECE_BYTES as usize) {
            let len = PIECE_BYTES.min(total - offset) as usize;
            let (back, piece) = tokio::task::spawn_blocking(move || {
                let mut failed = None;
                let piece = Segment::<u8>::build(len, |buf: &mut [u8]| {
                    failed = std::io::Read::read_exact(&mut file, buf).err();
                });
                failed.map_or(Ok((file, piece)), Err)
            })
            .await?
            .with_context(|| format!("reading {}", path.display()))?;
            file = back;
            let meta = ReplicaMeta { name: name.to_string(), sha256: digest.to_vec(), offset, total };
            let mut frame = OutFrame::new(Some(frame_header::Meta::Replica(meta)));
            frame.push("file", &piece).set_last(offset + len as u64 == total);
            send.send_frame(&frame).await?;
        }
        let _ = send.finish();
        let reply: Option<ErrorReply> = recv.recv_message().await?;
        match reply {
            Some(ErrorReply { code: 0, .. }) => Ok(()),
            Some(e) => bail!("{}", e.message),
            None => bail!("the stream closed without an answer"),
        }
    };
    tokio::time::timeout(within, send)
        .await
        .map_err(|_| anyhow::anyhow!("no answer within {within:?}"))?
        .with_context(|| format!("copying {name} to node {to}"))
}

/// Gives a job its second holder: picks a node, copies the graph there (and the features file
/// the job names, if any), then records the node in Raft (`Op::AddHolder`). The master calls it
/// with the job's first checkpoint, so the submit's path and short jobs never pay for the copy;
/// until then the submitting node is the job's only holder. A failed copy is logged and the job
/// keeps one holder.
pub async fn second_holder(shared: &Shared, job: u64, files: &JobFiles) {
    let started = std::time::Instant::now();
    let Some(to) = copy_graph(shared, &files.graph, &files.graph_digest).await else { return };
    if let Some((path, digest)) = &files.features
        && let Err(e) = push(shared, to, &graph_name(digest), path).await
    {
        tracing::warn!(job, node = to, error = %format!("{e:#}"), "the features file was not copied: only this node can run the job");
        return;
    }
    let cmd = Command {
        request: RequestId { client: shared.node_id, seq: super::jobs::unique_seq() },
        op: Op::AddHolder { job, node: to },
    };
    match super::peer::propose(shared, cmd, Duration::from_secs(10)).await {
        Ok(Outcome::Done) => {
            tracing::info!(job, node = to, seconds = started.elapsed().as_secs_f64(), "the job has a second holder")
        }
        Ok(other) => tracing::info!(job, node = to, outcome = ?other, "the second holder was not recorded"),
        Err(e) => tracing::warn!(job, node = to, error = %e, "recording the second holder failed"),
    }
}

/// How long a probed node has to echo a heartbeat while a copy to it runs: generous, since the
/// node is busy receiving (a killed node never answers, so this only delays the second offer).
const COPY_PROBE_WITHIN: Duration = Duration::from_millis(500);

/// Whether `node` echoes a heartbeat, asked after `after`.
async fn answers_after(shared: &Shared, node: u64, after: Duration) -> bool {
    tokio::time::sleep(after).await;
    let probe = async { shared.transport.connection(NodeId(node)).await?.ping_once().await };
    matches!(tokio::time::timeout(COPY_PROBE_WITHIN, probe).await, Ok(Ok(_)))
}

async fn copy_graph(shared: &Shared, path: &Path, digest: &[u8; 32]) -> Option<u64> {
    let me = shared.node_id;
    let others: Vec<u64> = {
        let v = shared.view.borrow();
        v.state
            .members
            .values()
            .filter(|m| m.liveness == Liveness::Alive && m.info.id != me)
            .map(|m| m.info.id)
            .collect()
    };
    if others.is_empty() {
        return None;
    }
    // Spread the copies over the cluster by graph. A node killed a moment ago still looks alive
    // for about a second, so while the first choice copies, it is probed every `stagger`: once it
    // stops answering (or refuses), a second node is offered the copy too and the first to store
    // it is the holder. A node that answers keeps the copy to itself: two copies of the graph at
    // once would double the traffic and the pieces the sender holds, while the job runs.
    let name = graph_name(digest);
    let first = usize::from(digest[0]) % others.len();
    let a = others[first];
    let b = (others.len() > 1).then(|| others[(first + 1) % others.len()]);
    let size = std::fs::metadata(path).map_or(0, |m| m.len());
    let stagger = Duration::from_millis(200) + Duration::from_secs_f64(size as f64 / 1e9);
    let to_a = push(shared, a, &name, path);
    tokio::pin!(to_a);
    let failed_a = loop {
        tokio::select! {
            r = &mut to_a => match r {
                Ok(()) => return Some(a),
                Err(e) => break Some(e),
            },
            alive = answers_after(shared, a, stagger) => if !alive {
                tracing::info!(node = a, "the graph's copy goes to a second node too: the first stopped answering");
                break None;
            },
        }
    };
    let Some(b) = b else {
        let r = match failed_a {
            Some(e) => Err(e),
            None => to_a.await,
        };
        return match r {
            Ok(()) => Some(a),
            Err(e) => {
                tracing::warn!(node = a, error = %format!("{e:#}"), "the job's graph has no second copy");
                None
            }
        };
    };
    let to_b = push(shared, b, &name, path);
    tokio::pin!(to_b);
    let mut a_done = failed_a.is_some();
    let mut b_done = false;
    let mut errors = Vec::new();
    if let Some(e) = failed_a {
        errors.push(format!("node {a}: {e:#}"));
    }
    while !(a_done && b_done) {
        tokio::select! {
            r = &mut to_a, if !a_done => match r {
                Ok(()) => return Some(a),
                Err(e) => { a_done = true; errors.push(format!("node {a}: {e:#}")); }
            },
            r = &mut to_b, if !b_done => match r {
                Ok(()) => return Some(b),
                Err(e) => { b_done = true; errors.push(format!("node {b}: {e:#}")); }
            },
        }
    }
    tracing::warn!(errors = %errors.join("; "), "the job's graph has no second copy: only this node can run it");
    None
}

/// Copies `name` (a file under this node's data directory) to every node of `to` but this one
/// that the replicated state sees alive; a holder that cannot take it is logged and skipped.
/// Returns the nodes that have it now.
pub async fn push_all(shared: &Shared, to: &[u64], name: &str) -> Vec<u64> {
    let path = shared.data_dir.join(name);
    let alive: Vec<u64> = {
        let v = shared.view.borrow();
        to.iter().copied().filter(|n| v.state.members.get(n).is_some_and(|m| m.liveness == Liveness::Alive)).collect()
    };
    let mut stored = Vec::new();
    for &node in alive.iter().filter(|&&n| n != shared.node_id) {
        match push(shared, node, name, &path).await {
            Ok(()) => stored.push(node),
            Err(e) => tracing::warn!(node, name, error = %format!("{e:#}"), "a job's second copy was not stored"),
        }
    }
    stored
}

/// Serves one `STREAM_KIND_REPLICA` stream: check, store, answer.
pub async fn handle_stream(shared: Shared, mut s: InboundStream) {
    let Some(mut send) = s.send.take() else { return };
    let stored = receive(&shared, &mut s).await;
    let reply = match &stored {
        Ok(name) => {
            metrics::counter!("quiver_replica_files_stored_total").increment(1);
            tracing::debug!(peer = %s.peer, name, "stored a replica file");
            ErrorReply { code: 0, message: String::new() }
        }
        Err(Failed::Abandoned(e)) => {
            // The sender stopped mid-file (its job ended, or it went away): nothing to answer.
            tracing::debug!(peer = %s.peer, error = %e, "a replica copy was abandoned by its sender");
            return;
        }
        Err(Failed::Refused(e)) => {
            tracing::warn!(peer = %s.peer, error = %e, "refused a replica file");
            ErrorReply { code: 3, message: e.clone() }
        }
    };
    let _ = send.send_message(&reply).await;
    let _ = send.finish();
}

/// Why a replica file was not stored.
enum Failed {
    /// The sender ended or reset the stream before the whole file arrived.
    Abandoned(String),
    /// The file or its pieces were wrong, or this node could not store it: the sender is told.
    Refused(String),
}

impl From<String> for Failed {
    fn from(e: String) -> Self {
        Failed::Refused(e)
    }
}

impl From<&str> for Failed {
    fn from(e: &str) -> Self {
        Failed::Refused(e.to_string())
    }
}

async fn receive(shared: &Shared, s: &mut InboundStream) -> Result<String, Failed> {
    let mut file: Option<(PathBuf, tokio::fs::File)> = None;
    let result = receive_into(shared, s, &mut file).await;
    if result.is_err()
        && let Some((tmp, f)) = file.take()
    {
        drop(f);
        let _ = tokio::fs::remove_file(&tmp).await;
    }
    result
}

/// Receives a file's pieces in order into a temporary file (`file`, so the caller can remove it
/// on error), hashing as they come; keeps it under its name once whole and its SHA-256 matches.
async fn receive_into(
    shared: &Shared,
    s: &mut InboundStream,
    file: &mut Option<(PathBuf, tokio::fs::File)>,
) -> Result<String, Failed> {
    use tokio::io::AsyncWriteExt;
    let mut first: Option<ReplicaMeta> = None;
    let mut digest = ring::digest::Context::new(&ring::digest::SHA256);
    let mut written = 0u64;
    loop {
        let frame = match s.recv.recv_frame().await {
            Ok(Some(frame)) => frame,
            Ok(None) => return Err(Failed::Abandoned("the stream ended before the whole file".into())),
            Err(e @ (StreamError::Truncated { .. } | StreamError::Read { .. })) => {
                return Err(Failed::Abandoned(format!("receiving the file: {e}")));
            }
            Err(e) => return Err(Failed::Refused(format!("receiving the file: {e}"))),
        };
        let Some(frame_header::Meta::Replica(meta)) = frame.header.meta.clone() else {
            return Err("the frame carries no ReplicaMeta".into());
        };
        let name = meta.name.clone();
        match &first {
            None => {
                check_name(&name)?;
                if meta.total > MAX_REPLICA_BYTES {
                    return Err(format!("{name}: {} bytes is more than {MAX_REPLICA_BYTES}", meta.total).into());
                }
                if let Some(hex) = name.strip_prefix("blobs/")
                    && crate::run::hex(&meta.sha256) != hex
                {
                    return Err(format!("{name}: a graph blob must be named by its SHA-256").into());
                }
                let tmp = temp_path(&shared.data_dir.join(&name));
                if let Some(dir) = tmp.parent() {
                    tokio::fs::create_dir_all(dir).await.map_err(|e| format!("{}: {e}", dir.display()))?;
                }
                let f = tokio::fs::File::create(&tmp).await.map_err(|e| format!("{}: {e}", tmp.display()))?;
                *file = Some((tmp, f));
                first = Some(meta.clone());
            }
            Some(f) if f.name != name || f.sha256 != meta.sha256 || f.total != meta.total => {
                return Err(format!("{name}: a piece of another file ({}) arrived on the same stream", f.name).into());
            }
            Some(_) => {}
        }
        if frame.segment_count() != 1 {
            return Err(
                format!("{name}: {} segments, expected one (a piece of the file)", frame.segment_count()).into()
            );
        }
        let bytes = frame.segment::<u8>(0).map_err(|e| format!("{name}: {e}"))?;
        let end = meta.offset.checked_add(bytes.len() as u64).filter(|&e| e <= meta.total);
        if meta.offset != written || end.is_none() {
            return Err(format!(
                "{name}: a piece at byte {} of {} bytes, expected the next from byte {written} of {}",
                meta.offset,
                bytes.len(),
                meta.total
            )
            .into());
        }
        digest.update(bytes.as_bytes());
        let (tmp, f) = file.as_mut().expect("created with the first piece");
        f.write_all(bytes.as_bytes()).await.map_err(|e| format!("{}: {e}", tmp.display()))?;
        written += bytes.len() as u64;
        if written == meta.total {
            break;
        }
    }
    let meta = first.expect("at least one piece arrived");
    if digest.finish().as_ref() != meta.sha256.as_slice() {
        return Err(format!("{}: the bytes' SHA-256 differs from the one sent", meta.name).into());
    }
    let (tmp, mut f) = file.take().expect("created with the first piece");
    f.flush().await.map_err(|e| format!("{}: {e}", tmp.display()))?;
    f.sync_all().await.map_err(|e| format!("{}: {e}", tmp.display()))?;
    drop(f);
    let path = shared.data_dir.join(&meta.name);
    tokio::fs::rename(&tmp, &path).await.map_err(|e| format!("{}: {e}", path.display()))?;
    if let Some(dir) = path.parent() {
        let _ = std::fs::File::open(dir).and_then(|d| d.sync_all());
    }
    // A complete checkpoint (its meta.json comes last) supersedes the job's older ones.
    if let ["checkpoints", job, step, "meta.json"] = meta.name.split('/').collect::<Vec<_>>().as_slice()
        && let (Ok(job), Ok(step)) = (job.parse::<u64>(), step.parse::<u32>())
    {
        remove_checkpoints_before(&shared.data_dir, job, step);
    }
    Ok(meta.name)
}

/// Removes job `job`'s checkpoints older than superstep `step` from `data_dir` (best effort).
pub fn remove_checkpoints_before(data_dir: &Path, job: u64, step: u32) {
    let Ok(entries) = std::fs::read_dir(data_dir.join("checkpoints").join(job.to_string())) else { return };
    for e in entries.flatten() {
        if e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()).is_some_and(|s| s < step) {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// `NAME.<unique>.part` beside `path` (two holders may send the same blob at once: each
/// writes its own temporary file).
fn temp_path(path: &Path) -> PathBuf {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".{}.part", NEXT.fetch_add(1, Ordering::Relaxed)));
    PathBuf::from(tmp)
}

/// Files younger than this are never collected: an upload being checked, a copy that arrived
/// before its holder was recorded, a temporary file still being written.
pub const GARBAGE_GRACE: Duration = Duration::from_secs(3600);

/// Removes what no unfinished job needs any more from `data_dir`: `blobs/<sha256>` that are
/// neither an unfinished job's graph nor its features file, `checkpoints/<job>/` of finished or
/// unknown jobs, and leftover `.part` files; anything modified within [`GARBAGE_GRACE`] of `now`
/// stays. Returns the paths removed. Results (`results/`) are kept: they are what clients fetch.
pub fn collect_garbage(
    data_dir: &Path,
    state: &quiver_coordinator::ClusterState,
    now: std::time::SystemTime,
) -> Vec<PathBuf> {
    let mut needed: std::collections::HashSet<String> = std::collections::HashSet::new();
    for j in state.jobs.values().filter(|j| !j.state.is_terminal()) {
        needed.insert(crate::run::hex(&j.graph_digest));
        if let Some(spec) = super::jobs::spec_of(j)
            && !spec.features_digest.is_empty()
        {
            needed.insert(crate::run::hex(&spec.features_digest));
        }
    }
    let old = |p: &Path| {
        std::fs::symlink_metadata(p)
            .and_then(|m| m.modified())
            .is_ok_and(|t| now.duration_since(t).is_ok_and(|age| age >= GARBAGE_GRACE))
    };
    let mut removed = Vec::new();
    let entries = |dir: PathBuf| std::fs::read_dir(dir).into_iter().flatten().flatten();
    for e in entries(data_dir.join("blobs")) {
        let (path, name) = (e.path(), e.file_name().to_string_lossy().into_owned());
        let blob = name.len() == 64 && name.bytes().all(|b| b.is_ascii_hexdigit());
        let part = name.ends_with(".part");
        if ((blob && !needed.contains(&name)) || part) && old(&path) && std::fs::remove_file(&path).is_ok() {
            removed.push(path);
        }
    }
    for e in entries(data_dir.join("checkpoints")) {
        let path = e.path();
        let finished = e
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u64>().ok())
            .is_some_and(|job| state.jobs.get(&job).is_none_or(|j| j.state.is_terminal()));
        if finished && old(&path) && std::fs::remove_dir_all(&path).is_ok() {
            removed.push(path);
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::check_name;

    #[test]
    fn only_blob_and_checkpoint_names_are_accepted() {
        let hex = "ab".repeat(32);
        assert!(check_name(&format!("blobs/{hex}")).is_ok());
        assert!(check_name("checkpoints/12/40/p0.values.npy").is_ok());
        assert!(check_name("checkpoints/12/40/meta.json").is_ok());
        for bad in [
            "blobs/short",
            "../etc/passwd",
            "/etc/passwd",
            "checkpoints/12/40/../../x",
            "checkpoints/x/40/meta.json",
            "checkpoints/12/40/meta.json.part",
            "checkpoints/12/40",
            "raft/log",
            "",
        ] {
            let e = check_name(bad).unwrap_err();
            assert!(e.contains("not a replica name"), "{bad}: {e}");
        }
    }

    #[test]
    fn garbage_is_what_no_unfinished_job_needs_and_is_old() {
        use std::time::{Duration, SystemTime};

        use quiver_coordinator::{ClusterState, Op};

        use super::super::fixtures::{apply, job_spec, member};

        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let mut s = ClusterState::bootstrap(&[member(1)], &[1]);
        let submit = |s: &mut ClusterState, seq: u64, digest: u8| {
            apply(s, seq, Op::Submit { spec: job_spec(vec![1]), graph_digest: [digest; 32] });
        };
        submit(&mut s, 1, 0xaa); // job 1: running
        submit(&mut s, 2, 0xbb); // job 2: cancelled below
        apply(&mut s, 3, Op::Cancel { job: 2 });
        let (running, cancelled) = (*s.jobs.keys().min().unwrap(), *s.jobs.keys().max().unwrap());
        std::fs::create_dir_all(root.join("blobs")).unwrap();
        for name in ["aa".repeat(32), "bb".repeat(32), "upload-1.part".into(), "notes".into()] {
            std::fs::write(root.join("blobs").join(name), b"x").unwrap();
        }
        for job in [running, cancelled, 99] {
            std::fs::create_dir_all(root.join(format!("checkpoints/{job}/20"))).unwrap();
        }
        // Nothing is old yet.
        assert!(super::collect_garbage(root, &s, SystemTime::now()).is_empty());
        let later = SystemTime::now() + super::GARBAGE_GRACE + Duration::from_secs(1);
        let mut removed: Vec<String> = super::collect_garbage(root, &s, later)
            .iter()
            .map(|p| p.strip_prefix(root).unwrap().display().to_string())
            .collect();
        removed.sort();
        let want = [
            format!("blobs/{}", "bb".repeat(32)),
            "blobs/upload-1.part".into(),
            format!("checkpoints/{cancelled}"),
            "checkpoints/99".into(),
        ];
        assert_eq!(removed, want);
        assert!(root.join("blobs").join("aa".repeat(32)).exists(), "the running job's graph stays");
        assert!(root.join("blobs/notes").exists(), "files that are not ours stay");
        assert!(root.join(format!("checkpoints/{running}/20")).exists());
    }
}
