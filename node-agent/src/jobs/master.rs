//! The job master: cuts the graph, hands partitions to their owners, runs the superstep barrier
//! and assembles the result.

use std::sync::Arc;
use std::time::Instant;

use quiver_compute::kernels::Stop;
use quiver_compute::kernels::superstep::{Globals, Partials};
use quiver_compute::{Csr, Segment};
use quiver_proto::peer::{JobMessage, JobPlan, StepGo, StreamHeader, StreamKind, job_message};
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use super::owner::{Rows, ToMaster, ToOwner, run_owner};
use super::wire::{OwnedPart, partials_from_wire};
use super::{JobKey, JobRuntime, KernelSpec};
use crate::transport::NodeId;

/// Everything a master needs to run one epoch of a job.
#[derive(Debug, Clone)]
pub struct MasterJob {
    pub key: JobKey,
    pub graph: Arc<Csr>,
    pub graph_digest: [u8; 32],
    pub kernel: KernelSpec,
    /// APPNP: the whole feature matrix (`vertices × width`); owners get views of their rows.
    pub features: Option<Segment<f32>>,
    pub stop: Stop,
    /// The owner of each partition; its length is the partition count.
    pub owners: Vec<NodeId>,
}

/// Progress after one superstep.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepReport {
    pub step: u32,
    pub residual: f32,
    /// Since the master started.
    pub elapsed_seconds: f64,
    /// The slowest owner's compute time in this step.
    pub compute_seconds: f64,
}

/// A finished run.
#[derive(Debug, Clone, PartialEq)]
pub struct MasterOutput {
    /// `vertices × width` values in vertex order.
    pub values: Vec<f32>,
    pub width: usize,
    pub iterations: u32,
    pub residual: f32,
}

/// Runs the job to the end. Dropping the future (cancellation) stops every local owner and
/// closes every job stream, which stops the remote owners.
pub async fn run_master(
    rt: Arc<JobRuntime>,
    job: MasterJob,
    mut report: impl FnMut(StepReport) + Send,
) -> Result<MasterOutput, String> {
    let started = Instant::now();
    let count = job.owners.len();
    if count == 0 {
        return Err("the assignment has no partitions".into());
    }
    let width = job.kernel.width();
    let g = job.graph.clone();
    let parts = rt
        .workers()
        .run(0, move || quiver_compute::partition::partition(&g, count))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    let plan = job.kernel.to_plan(job.graph.vertices() as u64, &job.owners);
    let (tx, mut rx) = mpsc::unbounded_channel::<(u32, ToMaster)>();
    let mut links = JoinSet::new();
    let mut to_owner = Vec::with_capacity(count);
    let me = rt.node();
    for p in &parts.parts {
        let features = job.features.as_ref().map(|f| {
            let r = p.graph.owned_range();
            f.slice(r.start as usize * width..r.end as usize * width)
        });
        let part = OwnedPart::from_partition(p, features);
        let (otx, orx) = mpsc::unbounded_channel();
        to_owner.push(otx);
        let node = job.owners[p.index];
        if node == me {
            links.spawn(run_owner(rt.clone(), job.key, part, job.kernel.clone(), job.owners.clone(), orx, tx.clone()));
        } else {
            links.spawn(remote_link(rt.clone(), job.key, node, part, job.graph_digest, plan.clone(), orx, tx.clone()));
        }
    }
    drop(parts);
    drop(tx);

    let mut partials = collect(&mut rx, 0, count, &job.owners).await?.0;
    let (mut iterations, mut residual) = (0u32, f32::INFINITY);
    while iterations < job.stop.max_iterations && !job.stop.tolerance.is_some_and(|t| residual <= t) {
        let step = iterations + 1;
        let globals = Globals::new(partials, step);
        for o in &to_owner {
            let _ = o.send(ToOwner::Go { step, mass: globals.mass });
        }
        let (p, compute_seconds) = collect(&mut rx, step, count, &job.owners).await?;
        partials = p;
        iterations = step;
        residual = partials.residual;
        report(StepReport { step, residual, elapsed_seconds: started.elapsed().as_secs_f64(), compute_seconds });
    }
    for o in &to_owner {
        let _ = o.send(ToOwner::Finish);
    }

    let bounds = {
        let g = &job.graph;
        quiver_compute::partition::boundaries(g, count, quiver_compute::partition::default_alpha(count))
            .map_err(|e| e.to_string())?
    };
    let mut rows: Vec<Option<Rows>> = (0..count).map(|_| None).collect();
    let mut missing = count;
    while missing > 0 {
        let Some((p, msg)) = rx.recv().await else {
            return Err("every partition link closed before the results arrived".into());
        };
        let pi = p as usize;
        match msg {
            ToMaster::Result(r) => {
                let want = (bounds[pi + 1] - bounds[pi]) as usize * width;
                if r.as_slice().len() != want {
                    return Err(format!("partition {p} sent {} result values, expected {want}", r.as_slice().len()));
                }
                if rows[pi].replace(r).is_none() {
                    missing -= 1;
                }
            }
            ToMaster::Failed(reason) => return Err(failed(p, &job.owners, &reason)),
            ToMaster::Partials { .. } => return Err(format!("partition {p} sent partials after Finish")),
        }
    }
    let mut values = Vec::with_capacity(job.graph.vertices() * width);
    for r in rows.into_iter().flatten() {
        values.extend_from_slice(r.as_slice());
    }
    links.shutdown().await;
    Ok(MasterOutput { values, width, iterations, residual })
}

fn failed(p: u32, owners: &[NodeId], reason: &str) -> String {
    match owners.get(p as usize) {
        Some(node) => format!("partition {p} on {node}: {reason}"),
        None => format!("partition {p}: {reason}"),
    }
}

/// Waits for every partition's partials of `step`; returns them combined and the slowest
/// owner's compute time.
async fn collect(
    rx: &mut mpsc::UnboundedReceiver<(u32, ToMaster)>,
    step: u32,
    count: usize,
    owners: &[NodeId],
) -> Result<(Partials, f64), String> {
    let mut seen = vec![false; count];
    let (mut combined, mut slowest, mut missing) = (Partials::default(), 0f64, count);
    while missing > 0 {
        let Some((p, msg)) = rx.recv().await else {
            return Err("every partition link closed mid-job".into());
        };
        match msg {
            ToMaster::Partials { step: s, partials, compute_seconds } if s == step => {
                let Some(slot) = seen.get_mut(p as usize).filter(|s| !**s) else {
                    return Err(format!("partition {p} reported superstep {step} twice"));
                };
                *slot = true;
                missing -= 1;
                combined = combined.combine(partials);
                slowest = slowest.max(compute_seconds);
            }
            ToMaster::Partials { step: s, .. } => {
                return Err(format!("partition {p} reported superstep {s} while the job is at {step}"));
            }
            ToMaster::Failed(reason) => return Err(failed(p, owners, &reason)),
            ToMaster::Result(_) => return Err(format!("partition {p} sent a result before Finish")),
        }
    }
    Ok((combined, slowest))
}

/// Carries one partition to a remote owner and relays messages both ways. Anything that goes
/// wrong is reported to the master as the partition's failure.
#[allow(clippy::too_many_arguments)]
async fn remote_link(
    rt: Arc<JobRuntime>,
    key: JobKey,
    node: NodeId,
    part: OwnedPart,
    digest: [u8; 32],
    plan: JobPlan,
    mut orx: mpsc::UnboundedReceiver<ToOwner>,
    tx: mpsc::UnboundedSender<(u32, ToMaster)>,
) {
    let p = part.index;
    let fail = |reason: String| {
        let _ = tx.send((p, ToMaster::Failed(reason)));
    };
    let header = StreamHeader {
        kind: StreamKind::Job as i32,
        job_id: key.job,
        epoch: key.epoch,
        partition: p,
        ..Default::default()
    };
    let opened = async {
        let conn = rt.transport.connection(node).await.map_err(|e| e.to_string())?;
        let (mut send, recv) = conn.open_bi(header).await.map_err(|e| e.to_string())?;
        send.send_frame(&part.to_frame(&digest)).await.map_err(|e| e.to_string())?;
        send.send_message(&JobMessage { body: Some(job_message::Body::Plan(plan)) })
            .await
            .map_err(|e| e.to_string())?;
        Ok::<_, String>((send, recv))
    };
    let (mut send, mut recv) = match opened.await {
        Ok(x) => x,
        Err(e) => return fail(format!("sending the partition: {e}")),
    };
    drop(part);
    let reader = {
        let tx = tx.clone();
        async move {
            loop {
                match recv.recv_message::<JobMessage>().await {
                    Ok(Some(JobMessage { body: Some(job_message::Body::Partials(w)) })) => match partials_from_wire(&w)
                    {
                        Ok((step, partials, compute_seconds)) => {
                            let _ = tx.send((p, ToMaster::Partials { step, partials, compute_seconds }));
                        }
                        Err(e) => return Err(e),
                    },
                    Ok(Some(JobMessage { body: Some(job_message::Body::ResultFollows(_)) })) => {
                        let frame = recv.recv_frame().await.map_err(|e| e.to_string())?.ok_or("no result frame")?;
                        let values = frame.segment::<f32>(0).map_err(|e| format!("result frame: {e}"))?;
                        let _ = tx.send((p, ToMaster::Result(Rows::Received(values))));
                        return Ok(());
                    }
                    Ok(Some(JobMessage { body: Some(job_message::Body::Abort(reason)) })) => return Err(reason),
                    Ok(Some(_)) => return Err("unexpected message from the owner".to_string()),
                    Ok(None) => return Err("the owner closed the job stream".to_string()),
                    Err(e) => return Err(e.to_string()),
                }
            }
        }
    };
    let writer = async move {
        while let Some(m) = orx.recv().await {
            let body = match m {
                ToOwner::Go { step, mass } => job_message::Body::Go(StepGo { step, mass }),
                ToOwner::Finish => job_message::Body::Finish(true),
            };
            if let Err(e) = send.send_message(&JobMessage { body: Some(body) }).await {
                return Err(e.to_string());
            }
        }
        // The master is done with this partition (or gone): close our half.
        let _ = send.finish();
        std::future::pending::<Result<(), String>>().await
    };
    tokio::pin!(reader, writer);
    let outcome = tokio::select! {
        r = &mut reader => r,
        w = &mut writer => w,
    };
    if let Err(reason) = outcome {
        fail(reason);
    }
}
