//! # quiver-benches — benchmarks
//!
//! Criterion benches live in `benches/benches/`; `benches/peers/` compares against SciPy,
//! NetworKit and PyTorch; results are recorded in `benches/RESULTS.md`.
