#!/usr/bin/env python3
"""Time the same diffusion work in SciPy, NetworKit and PyTorch, on the same graph file as Quiver.

Loads a Quiver `.qcsr` file (the binary CSR of in-edges, read with numpy straight from the file's
arrays), then times, in-process and excluding the load:

- scipy:     PageRank by CSR SpMV (SciPy's sparse kernels are single-threaded), f32;
- networkit: its parallel PageRank (threads as given), fixed iteration count;
- torch:     APPNP feature propagation X <- (1-a)·Â·X + a·X0 with torch.sparse.mm, f32, d features.

Prints one JSON object per measurement: {"peer", "work", "seconds_per_iteration", "iterations", "threads"}.
`cargo xtask bench peers` runs this next to `quiver run` and prints the ratio table.
"""
import argparse
import json
import struct
import sys
import time

import numpy as np


def load_qcsr(path):
    """Returns (n, offsets u64[n+1], sources u32[m], out_degree u32[n]) from a .qcsr file."""
    import qcsr  # the format reader, kept beside this script next to the format's spec

    return qcsr.read(path)


def best_of(reps, fn):
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def scipy_pagerank(n, offsets, sources, outdeg, iterations, damping, reps):
    import scipy.sparse as sp

    inv = np.zeros(n, dtype=np.float32)
    nz = outdeg > 0
    inv[nz] = 1.0 / outdeg[nz].astype(np.float32)
    m = sp.csr_matrix((inv[sources], sources, offsets), shape=(n, n), dtype=np.float32)
    dangling = ~nz

    def run():
        x = np.full(n, 1.0 / n, dtype=np.float32)
        for _ in range(iterations):
            d = np.float32(x[dangling].sum())
            x = damping * (m @ x) + np.float32((damping * d + (1.0 - damping)) / n)
        return x

    return best_of(reps, run) / iterations


def networkit_pagerank(n, offsets, sources, threads, iterations, damping, reps):
    import networkit as nk

    nk.setNumberOfThreads(threads)
    targets = np.repeat(np.arange(n, dtype=np.uint32), np.diff(offsets).astype(np.int64))
    g = nk.GraphFromCoo((np.ones(len(sources), dtype=np.float64), (sources, targets)), n, directed=True, weighted=False)
    per_iter = []

    def run():
        pr = nk.centrality.PageRank(g, damp=damping, tol=1e-300)
        pr.maxIterations = iterations
        t = time.perf_counter()
        pr.run()
        per_iter.append((time.perf_counter() - t) / max(pr.numberOfIterations(), 1))

    for _ in range(reps):
        run()
    return min(per_iter)


def torch_appnp(n, offsets, sources, threads, iterations, alpha, dim, reps):
    import torch

    torch.set_num_threads(threads)
    # Â = D^-1/2 (A + I) D^-1/2 (GCN normalisation), built once outside the timing.
    deg = np.diff(offsets).astype(np.float64) + 1.0
    rows = np.repeat(np.arange(n, dtype=np.int64), np.diff(offsets).astype(np.int64))
    cols = sources.astype(np.int64)
    rows = np.concatenate([rows, np.arange(n, dtype=np.int64)])
    cols = np.concatenate([cols, np.arange(n, dtype=np.int64)])
    vals = (1.0 / np.sqrt(deg[rows] * deg[cols])).astype(np.float32)
    a = torch.sparse_coo_tensor(np.vstack([rows, cols]), vals, (n, n)).coalesce().to_sparse_csr()
    del rows, cols, vals
    gen = torch.Generator().manual_seed(7)
    x0 = torch.rand((n, dim), generator=gen, dtype=torch.float32)

    def run():
        x = x0
        for _ in range(iterations):
            x = (1.0 - alpha) * torch.sparse.mm(a, x) + alpha * x0
        return x

    return best_of(reps, run) / iterations


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--graph", required=True, help="a .qcsr file")
    p.add_argument("--peers", default="scipy,networkit,torch")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--iterations", type=int, default=20)
    p.add_argument("--appnp-iterations", type=int, default=5)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--damping", type=float, default=0.85)
    p.add_argument("--alpha", type=float, default=0.1)
    p.add_argument("--reps", type=int, default=3)
    a = p.parse_args()

    n, offsets, sources, outdeg = load_qcsr(a.graph)
    peers = a.peers.split(",")
    out = []
    if "scipy" in peers:
        s = scipy_pagerank(n, offsets, sources, outdeg, a.iterations, a.damping, a.reps)
        out.append({"peer": "scipy", "work": "pagerank", "seconds_per_iteration": s, "threads": 1})
    if "networkit" in peers:
        s = networkit_pagerank(n, offsets, sources, a.threads, a.iterations, a.damping, a.reps)
        out.append({"peer": "networkit", "work": "pagerank", "seconds_per_iteration": s, "threads": a.threads})
    if "torch" in peers:
        s = torch_appnp(n, offsets, sources, a.threads, a.appnp_iterations, a.alpha, a.dim, a.reps)
        out.append({"peer": "torch", "work": f"appnp-d{a.dim}", "seconds_per_iteration": s, "threads": a.threads})
    for o in out:
        print(json.dumps(o), flush=True)


if __name__ == "__main__":
    sys.exit(main())
