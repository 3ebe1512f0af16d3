#!/usr/bin/env python3
"""Write SciPy reference results for Quiver's kernel tests into compute/tests/fixtures/.

Run once by hand when the fixtures need to change (the tests themselves never need Python):

    python3 -m venv .venv && .venv/bin/pip install scipy numpy
    .venv/bin/python benches/peers/make_fixtures.py

The graph is a small directed random graph with dangling vertices, drawn with numpy's PCG64 from
a fixed seed. References are computed independently of Quiver's iteration scheme where possible:

- pagerank / ppr: the exact fixed point by a sparse linear solve,
  x = d·M x + (1-d)·s with M = A^T D^-1 + s·dangling^T (dangling mass goes to s), f64;
- heat:  scipy.linalg.expm of -t(I - W) applied to s, with W = A^T D^-1 + (1/n)·1·dangling^T;
- appnp: K = 10 iterations of X <- (1-a)·Â X + a·X0 in f64 on Ã = A + I, symmetric
  (D̃^-1/2 Ã D̃^-1/2) and random-walk (D̃^-1 Ã) normalisation, D̃ = in-degree + 1.

Files (text, one value per line, %.9e): scipy_graph.el (edges "u v"), scipy_features.txt (n×4
row-major, values exactly representable in f32), scipy_pagerank.txt, scipy_ppr.txt,
scipy_heat.txt, scipy_appnp_sym.txt, scipy_appnp_rw.txt. Parameters are in PARAMS below and are
repeated in the Rust test (compute/src/kernels/tests.rs, `scipy_fixtures`).
"""
import pathlib

import numpy as np
import scipy.linalg
import scipy.sparse as sp
import scipy.sparse.linalg

PARAMS = dict(n=300, edges=1200, seed=20261123, damping=0.85, seeds=[0, 5, 17], t=2.0, alpha=0.1, k=10, dim=4)
OUT = pathlib.Path(__file__).resolve().parents[2] / "compute" / "tests" / "fixtures"


def graph(n, m, rng):
    src = rng.integers(0, n, m)
    dst = rng.integers(0, n, m)
    keep = src != dst
    pairs = sorted(set(zip(src[keep].tolist(), dst[keep].tolist())))
    # Make the first 10 vertices dangling so dangling mass matters.
    pairs = [(u, v) for (u, v) in pairs if u >= 10 or u in (0, 5)]
    u = np.array([p[0] for p in pairs])
    v = np.array([p[1] for p in pairs])
    a = sp.csr_matrix((np.ones(len(u)), (u, v)), shape=(n, n))  # a[u, v] = 1 for edge u -> v
    return pairs, a


def walk_matrix(a, target):
    """W = A^T D^-1 + target · dangling^T (column-stochastic)."""
    n = a.shape[0]
    outdeg = np.asarray(a.sum(axis=1)).ravel()
    inv = np.where(outdeg > 0, 1.0 / np.maximum(outdeg, 1), 0.0)
    w = (a.T @ sp.diags(inv)).toarray()
    w += np.outer(target, (outdeg == 0).astype(float))
    return w


def main():
    p = PARAMS
    n = p["n"]
    rng = np.random.Generator(np.random.PCG64(p["seed"]))
    pairs, a = graph(n, p["edges"], rng)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "scipy_graph.el").write_text("".join(f"{u} {v}\n" for u, v in pairs))

    def save(name, values):
        (OUT / name).write_text("".join(f"{x:.9e}\n" for x in np.asarray(values, dtype=np.float64).ravel()))

    d = p["damping"]
    uniform = np.full(n, 1.0 / n)
    s = np.zeros(n)
    s[p["seeds"]] = 1.0 / len(p["seeds"])
    for name, target in [("scipy_pagerank.txt", uniform), ("scipy_ppr.txt", s)]:
        m = walk_matrix(a, target)
        x = np.linalg.solve(np.eye(n) - d * m, (1 - d) * target)
        save(name, x)

    w = walk_matrix(a, uniform)
    save("scipy_heat.txt", scipy.linalg.expm(-p["t"] * (np.eye(n) - w)) @ s)

    x0 = rng.random((n, p["dim"]), dtype=np.float32).astype(np.float64)
    save("scipy_features.txt", x0)
    at = sp.csr_matrix(a.T) + sp.eye(n)  # row v lists in-neighbours of v, plus v itself
    deg = np.asarray(at.sum(axis=1)).ravel()
    norms = {
        "sym": sp.diags(deg**-0.5) @ at @ sp.diags(deg**-0.5),
        "rw": sp.diags(1.0 / deg) @ at,
    }
    for name, ahat in norms.items():
        x = x0.copy()
        for _ in range(p["k"]):
            x = (1 - p["alpha"]) * (ahat @ x) + p["alpha"] * x0
        save(f"scipy_appnp_{name}.txt", x)


if __name__ == "__main__":
    main()
