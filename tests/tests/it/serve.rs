//! The serving path against real agents: `Diffuse` equals `quiver run` bit for bit, bad
//! requests get `INVALID_ARGUMENT` naming the field while the node keeps serving, a full queue
//! answers `RESOURCE_EXHAUSTED`, and a loaded node forwards to its less-loaded peer.

use std::time::{Duration, Instant};

use crate::grpc;
use quiver_proto::control::cluster_client::ClusterClient;
use quiver_proto::control::diffusion_client::DiffusionClient;
use quiver_proto::control::{DiffuseRequest, DiffuseResponse, Kernel, KernelParams, StatusRequest};
use quiver_tests::agents::{LocalCluster, wait_for};
use quiver_tests::bin::quiver;
use tonic::Code;
use tonic::transport::Channel;

const READY: Duration = Duration::from_secs(20);

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

fn ppr(vertices: u32, edges: &[(u32, u32)], seeds: &[u32], iterations: u32) -> DiffuseRequest {
    DiffuseRequest {
        vertices,
        sources: edges.iter().map(|e| e.0).collect(),
        targets: edges.iter().map(|e| e.1).collect(),
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

/// A seeded random graph (SplitMix64), as edge pairs.
fn random_edges(vertices: u32, edges: usize, seed: u64) -> Vec<(u32, u32)> {
    let mut s = seed;
    let mut next = move || {
        s = s.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = s;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        ((z ^ (z >> 31)) >> 32) as u32 % vertices
    };
    (0..edges).map(|_| (next(), next())).collect()
}

/// The f32 values of a `.npy` file written by `quiver run`.
fn read_npy_f32(path: &std::path::Path) -> Vec<f32> {
    let bytes = std::fs::read(path).unwrap();
    assert_eq!(&bytes[..6], b"\x93NUMPY", "{}", path.display());
    let (header_len, start) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        _ => (u32::from_le_bytes(bytes[8..12].try_into().unwrap()) as usize, 12),
    };
    let header = std::str::from_utf8(&bytes[start..start + header_len]).unwrap();
    assert!(header.contains("<f4"), "{header}");
    bytes[start + header_len..].chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

async fn diffuse(ch: &Channel, r: DiffuseRequest) -> Result<DiffuseResponse, tonic::Status> {
    DiffusionClient::new(ch.clone()).diffuse(r).await.map(tonic::Response::into_inner)
}

#[test]
fn diffuse_equals_quiver_run_rejects_bad_requests_and_bounds_its_queue() {
    let mut c = LocalCluster::new(&["s1"]);
    c.agents[0].start(&["--bootstrap", "--serve-queue-limit", "1", "--worker-threads", "1"]);
    c.agents[0].wait_ready(READY);

    // A graph with a duplicate edge, a self loop, a dangling and an isolated vertex.
    let edges = [(0, 1), (1, 2), (2, 0), (2, 3), (3, 3), (0, 1), (4, 2), (1, 5)];
    let dir = c.dir.path();
    let text: String = std::iter::once("# Nodes: 7 Edges: 8\n".to_string())
        .chain(edges.iter().map(|(u, v)| format!("{u} {v}\n")))
        .collect();
    std::fs::write(dir.join("g.el"), text).unwrap();
    let reference = dir.join("ref.npy");
    quiver(
        dir,
        &[
            "run",
            "--graph",
            "g.el",
            "--algo",
            "ppr",
            "--seeds",
            "2,0",
            "--iterations",
            "10",
            "--out",
            reference.to_str().unwrap(),
        ],
    )
    .ok();
    let want = read_npy_f32(&reference);
    assert_eq!(want.len(), 7);

    let log = || c.logs();
    runtime().block_on(async {
        let ch = grpc(&c, 0).await;
        let got = diffuse(&ch, ppr(7, &edges, &[2, 0], 10)).await.unwrap_or_else(|e| panic!("{e:?}\n{}", log()));
        assert_eq!(bits(&got.values), bits(&want), "Diffuse differs from quiver run");
        assert_eq!((got.iterations, got.width, got.cached), (10, 1, false));
        // The same request again comes from the cache, with the same bits.
        let again = diffuse(&ch, ppr(7, &edges, &[0, 2], 10)).await.unwrap();
        assert!(again.cached);
        assert_eq!(bits(&again.values), bits(&want));
        // Packed ids are the same request: the same bits, from the cache the plain form filled.
        let mut packed = ppr(7, &edges, &[2, 0], 10);
        packed.pack_edges();
        let got = diffuse(&ch, packed.clone()).await.unwrap();
        assert!(got.cached, "packed and plain edge lists must share a cache key");
        assert_eq!(bits(&got.values), bits(&want));
        packed.params.as_mut().unwrap().max_iterations = 9;
        let got = diffuse(&ch, packed.clone()).await.unwrap();
        assert_eq!((got.iterations, got.cached), (9, false));
        packed.sources_le.pop();
        let e = diffuse(&ch, packed).await.unwrap_err();
        assert!(e.code() == Code::InvalidArgument && e.message().starts_with("sources_le:"), "{e:?}");

        // Bad requests name the field; the node keeps serving.
        let e = diffuse(&ch, ppr(0, &[], &[0], 10)).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
        assert!(e.message().starts_with("vertices:"), "{}", e.message());
        let e = diffuse(&ch, ppr(7, &edges, &[9], 10)).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
        assert!(e.message().starts_with("params.seeds[0]:"), "{}", e.message());
        let mut r = ppr(7, &edges, &[0], 10);
        r.targets.pop();
        let e = diffuse(&ch, r).await.unwrap_err();
        assert!(e.code() == Code::InvalidArgument && e.message().starts_with("targets:"), "{e:?}");
        assert!(diffuse(&ch, ppr(7, &edges, &[3], 5)).await.is_ok());

        // Queue limit 1: bursts of slow, distinct requests until one is refused (each burst
        // overlaps on the one worker; a deadline, not a sleep, bounds the wait).
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut burst = 0u64;
        let refused = loop {
            assert!(Instant::now() < deadline, "no RESOURCE_EXHAUSTED within 60 s of bursts\n{}", log());
            let tasks: Vec<_> = (0..8)
                .map(|i| {
                    let ch = ch.clone();
                    let r = ppr(20_000, &random_edges(20_000, 100_000, burst * 100 + i), &[1], 200);
                    tokio::spawn(async move { diffuse(&ch, r).await })
                })
                .collect();
            burst += 1;
            let mut refused = None;
            for t in tasks {
                match t.await.unwrap() {
                    Ok(_) => {}
                    Err(e) if e.code() == Code::ResourceExhausted => refused = Some(e),
                    Err(e) => panic!("unexpected {e:?}\n{}", log()),
                }
            }
            if let Some(e) = refused {
                break e;
            }
        };
        assert!(refused.message().contains("queue full"), "{}", refused.message());
        // Still serving afterwards.
        let after = diffuse(&ch, ppr(7, &edges, &[2, 0], 10)).await.unwrap();
        assert_eq!(bits(&after.values), bits(&want));
    });
    let (code, metrics) = c.agents[0].http_get("/metrics").unwrap();
    assert_eq!(code, 200);
    for name in [
        "quiver_serve_request_seconds",
        "quiver_serve_requests_total",
        "quiver_serve_queue_depth",
        "quiver_serve_cache_hits_total",
        "quiver_serve_cache_misses_total",
    ] {
        assert!(metrics.contains(name), "{name} missing from /metrics");
    }
    assert!(metrics.contains("outcome=\"rejected\""), "no rejected outcome in /metrics");
}

#[test]
fn a_loaded_node_forwards_to_its_less_loaded_peer() {
    let mut c = LocalCluster::new(&["f1", "f2"]);
    // f1 counts as loaded for every request (threshold 0); f2 keeps the default.
    c.agents[0].start(&["--bootstrap", "--serve-forward-threshold", "0"]);
    c.agents[0].wait_ready(READY);
    let seed = c.agents[0].peer_addr();
    c.agents[1].start(&["--join", &seed]);
    c.agents[1].wait_ready(READY);
    let rt = runtime();
    let (ch1, ch2) = rt.block_on(async { (grpc(&c, 0).await, grpc(&c, 1).await) });
    let id = |ch: &Channel| {
        let ch = ch.clone();
        rt.block_on(async move { ClusterClient::new(ch).status(StatusRequest {}).await.unwrap().into_inner().node_id })
    };
    let (n1, n2) = (id(&ch1), id(&ch2));
    let edges = random_edges(50, 200, 7);
    let mut seed_vertex = 0;
    // Until f1 has a fresh load report from f2 it computes requests itself; each attempt is a
    // new request so the cache cannot answer it.
    let forwarded = wait_for("a request served by f2", Duration::from_secs(20), || {
        seed_vertex += 1;
        let r = ppr(50, &edges, &[seed_vertex % 50], 10);
        let got = rt.block_on(diffuse(&ch1, r.clone())).map_err(|e| format!("{e:?}"))?;
        if got.served_by == n2 { Ok((r, got)) } else { Err(format!("served by {} (f1 is {n1})", got.served_by)) }
    });
    let (r, got) = forwarded;
    assert!(!got.cached);
    // f2 answers the same request itself, from its cache, with the same bits; it never forwards
    // a forwarded request back.
    let direct = rt.block_on(diffuse(&ch2, r)).unwrap();
    assert_eq!(direct.served_by, n2);
    assert_eq!(bits(&direct.values), bits(&got.values));
    let (_, metrics) = c.agents[0].http_get("/metrics").unwrap();
    assert!(metrics.contains("quiver_serve_forwards_total{result=\"ok\"}"), "no forwards counted on f1");
    let (_, metrics) = c.agents[1].http_get("/metrics").unwrap();
    assert!(metrics.contains("quiver_serve_forwarded_in_total"), "no forwarded requests counted on f2");
}
