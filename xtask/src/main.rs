//! `cargo xtask <task>`: developer tasks written in Rust so the only prerequisite is cargo.
//!
//! - `ci`: formatting, clippy with warnings denied, then the whole test suite (what `.ci/run` runs).
//! - `bench peers`: the compute core against SciPy, NetworKit and PyTorch (see `peers.rs`).
//! - `docker`: the `quiver:local` image without a registry; `compose-test`: the Compose cluster
//!   test with Docker drills, which `ci` runs when a Docker engine answers (see `docker.rs`).
//! - `chaos [ARGS…]`: every failover drill with 20 seeds on a release build with failpoints
//!   (`quiver chaos run --drill all --seeds 1..=20`; extra ARGS replace those defaults).

mod deploy_checks;
mod docker;
mod peers;
mod tidy;

use std::process::Command;

use anyhow::{Context, Result, bail};

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("ci") => ci(),
        Some("docker") => docker::build_image(&root(), docker::cargo_build_wanted(&args[1..])).map(drop),
        Some("compose-test") => docker::compose_test(&root(), docker::cargo_build_wanted(&args[1..])),
        Some("bench") if args.get(1).map(String::as_str) == Some("peers") => peers::peers(&root(), &args[2..]),
        Some("chaos") => chaos(&args[1..]),
        Some(other) => bail!("unknown task {other:?}; tasks: ci, bench peers, docker, compose-test, chaos"),
        None => bail!("usage: cargo xtask <task>; tasks: ci, bench peers, docker, compose-test, chaos"),
    }
}

/// The workspace root: the parent of `CARGO_MANIFEST_DIR` as cargo sets it when it runs xtask or
/// its tests, else as it was at build time. Not the build-time value first: two checkouts that
/// share a target directory share this binary, and the checkout it runs for is the one cargo ran in.
fn root() -> std::path::PathBuf {
    let manifest = std::env::var_os("CARGO_MANIFEST_DIR")
        .map_or_else(|| env!("CARGO_MANIFEST_DIR").into(), std::path::PathBuf::from);
    manifest.parent().expect("xtask lives in the workspace").to_path_buf()
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

/// The full drill set: a release `quiver` with failpoints compiled in, then every drill with
/// seeds 1..=20 (or the caller's `quiver chaos run` flags).
fn chaos(extra: &[String]) -> Result<()> {
    cargo(&["build", "--release", "-p", "quiver", "--features", "failpoints"])?;
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root().join("target"), std::path::PathBuf::from);
    let bin = target.join("release").join("quiver");
    let mut args: Vec<String> = vec!["chaos".into(), "run".into()];
    if extra.is_empty() {
        args.extend(["--drill", "all", "--seeds", "1..=20"].map(String::from));
    } else {
        args.extend(extra.iter().cloned());
    }
    eprintln!("$ {} {}", bin.display(), args.join(" "));
    let status = Command::new(&bin).args(&args).status().with_context(|| format!("running {}", bin.display()))?;
    if !status.success() {
        bail!("quiver chaos run failed with {status}");
    }
    Ok(())
}

fn ci() -> Result<()> {
    cargo(&["fmt", "--all", "--", "--check"])?;
    cargo(&["clippy", "--workspace", "--all-targets", "--", "-D", "warnings"])?;
    cargo(&["test", "--workspace"])?;
    docker::ci(&root())?;
    Ok(())
}
