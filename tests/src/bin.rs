//! Running the real `quiver` binary from tests, as a user would (ripgrep's `tests/util.rs` idea).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

/// Path of the `quiver` binary of this build profile, building it once if needed.
///
/// Integration tests live in this crate, which cannot depend on a binary crate, so the binary is
/// found next to the test executable (`target/<profile>/quiver`); `cargo test --workspace` has
/// already built it, and a lone `cargo test -p quiver-tests` builds it here.
pub fn quiver_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let exe = std::env::current_exe().expect("test executable path");
        // target/<profile>/deps/it-<hash> → target/<profile>/quiver
        let profile_dir = exe.parent().and_then(Path::parent).expect("target/<profile>/deps layout").to_path_buf();
        let bin = profile_dir.join("quiver");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "--quiet", "-p", "quiver"]);
        if profile_dir.file_name().is_some_and(|p| p == "release") {
            cmd.arg("--release");
        }
        // Always ask cargo: it is a no-op when the binary is fresh, and rebuilds a stale one.
        let status = cmd.status().expect("running cargo build -p quiver");
        assert!(status.success(), "cargo build -p quiver failed");
        assert!(bin.exists(), "{} was not built", bin.display());
        bin
    })
}

/// A finished `quiver` invocation.
#[derive(Debug)]
pub struct Run {
    pub status: std::process::ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    /// Asserts success and returns stdout.
    #[track_caller]
    pub fn ok(&self) -> &str {
        assert!(
            self.status.success(),
            "quiver failed ({}):\nstdout: {}\nstderr: {}",
            self.status,
            self.stdout,
            self.stderr
        );
        &self.stdout
    }

    /// Asserts failure and returns stderr.
    #[track_caller]
    pub fn err(&self) -> &str {
        assert!(!self.status.success(), "quiver unexpectedly succeeded:\nstdout: {}", self.stdout);
        &self.stderr
    }

    /// Parses the last stdout line as JSON.
    #[track_caller]
    pub fn json(&self) -> serde_json::Value {
        let line = self.ok().lines().last().unwrap_or_default();
        serde_json::from_str(line).unwrap_or_else(|e| panic!("last line is not JSON ({e}): {line}"))
    }
}

/// Runs `quiver ARGS…` in `dir` and waits for it.
pub fn quiver(dir: &Path, args: &[&str]) -> Run {
    let Output { status, stdout, stderr } =
        Command::new(quiver_bin()).args(args).current_dir(dir).output().expect("spawning quiver");
    Run { status, stdout: String::from_utf8_lossy(&stdout).into(), stderr: String::from_utf8_lossy(&stderr).into() }
}
