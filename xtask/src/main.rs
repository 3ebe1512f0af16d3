//! `cargo xtask <task>`: developer tasks written in Rust so the only prerequisite is cargo.
//!
//! - `ci`: formatting, clippy with warnings denied, then the whole test suite (what `.ci/run` runs).
//! - `bench peers`: the compute core against SciPy, NetworKit and PyTorch (see `peers.rs`).

mod peers;
mod tidy;

use std::process::Command;

use anyhow::{Context, Result, bail};

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("ci") => ci(),
        Some("bench") if args.get(1).map(String::as_str) == Some("peers") => peers::peers(&root(), &args[2..]),
        Some(other) => bail!("unknown task {other:?}; tasks: ci, bench peers"),
        None => bail!("usage: cargo xtask <task>; tasks: ci, bench peers"),
    }
}

/// The workspace root.
fn root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask lives in the workspace").to_path_buf()
}

fn cargo(args: &[&str]) -> Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    eprintln!("$ cargo {}", args.join(" "));
    let status = Command::new(cargo).args(args).status().context("running cargo")?;
    if !status.success() {
        bail!("cargo {} failed with {status}", args.join(" "));
    }
    Ok(())
}

fn ci() -> Result<()> {
    cargo(&["fmt", "--all", "--", "--check"])?;
    cargo(&["clippy", "--workspace", "--all-targets", "--", "-D", "warnings"])?;
    cargo(&["test", "--workspace"])?;
    Ok(())
}
