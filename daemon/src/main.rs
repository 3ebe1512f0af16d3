//! `quiver`: the agent daemon and the operator CLI, one binary like `nomad` or `consul`.
//!
//! `main` only parses the command line and dispatches; each subcommand lives in its own module.

mod agent;
mod bench;
mod chaos;
mod client;
mod coalesce;
mod config;
mod demo;
mod graph;
mod http;
mod probe;
mod run;
mod sys;
mod tls;
mod token;

use std::process::ExitCode;

use clap::Parser;

/// Quiver: a QUIC-native distributed mesh for graph diffusion.
#[derive(Debug, Parser)]
#[command(name = "quiver", version, about)]
enum Cli {
    /// Generate, convert and describe graph files.
    #[command(subcommand)]
    Graph(graph::GraphCmd),
    /// Show Quiver end to end on a generated graph, with nothing to set up.
    Demo(demo::DemoArgs),
    /// Run one diffusion in this process (no cluster): the single-machine baseline.
    Run(run::RunArgs),
    /// Benchmarks: each prints a human summary, or one JSON object on the last line with --json.
    #[command(subcommand)]
    Bench(bench::Bench),
    /// Run the agent daemon (one per host).
    Agent(config::AgentArgs),
    /// Certificates: the cluster CA, node and client certificates.
    #[command(subcommand)]
    Tls(tls::TlsCmd),
    /// Join and API tokens, minted by a running agent.
    #[command(subcommand)]
    Token(token::TokenCmd),
    /// List the cluster's members.
    Members(client::Conn),
    /// Show this node's view of the cluster (leader, term, readiness).
    Status(client::Conn),
    /// Submit a diffusion job to the cluster (--wait to follow it to the end).
    Submit(client::SubmitArgs),
    /// Download a finished job's result.
    Result(client::ResultArgs),
    /// Inspect, watch and cancel jobs.
    #[command(subcommand)]
    Job(client::JobCmd),
    /// Remove a member from the cluster.
    Leave(client::LeaveArgs),
    /// Failover drills on a local cluster of this binary: inject a fault, check the verdicts.
    #[command(subcommand)]
    Chaos(chaos::ChaosCmd),
    /// Probe an agent's /healthz (or /readyz with --ready): exit 0 when it answers 200.
    Health(probe::HealthArgs),
}

fn main() -> ExitCode {
    match dispatch(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", error_line(&e));
            ExitCode::FAILURE
        }
    }
}

fn dispatch(cli: Cli) -> anyhow::Result<()> {
    match cli {
        Cli::Graph(g) => graph::run(g),
        Cli::Run(r) => run::run(r),
        Cli::Demo(d) => demo::run(d),
        Cli::Bench(b) => bench::run(b),
        Cli::Agent(a) => agent::main(a),
        Cli::Tls(t) => tls::run(t),
        Cli::Token(t) => token::run(t),
        Cli::Members(c) => client::members(c),
        Cli::Status(c) => client::status(c),
        Cli::Submit(s) => client::submit(s),
        Cli::Job(j) => client::job(j),
        Cli::Result(r) => client::result(r),
        Cli::Leave(l) => client::leave(l),
        Cli::Chaos(c) => chaos::run(c),
        Cli::Health(h) => probe::run(h),
    }
}

/// One line naming what failed and why, then its causes (skipping a cause whose text the line
/// already ends with, as errors that embed their source do); no backtrace for user errors.
fn error_line(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if !line.ends_with(&text) {
            if !line.is_empty() {
                line.push_str(": ");
            }
            line.push_str(&text);
        }
    }
    line
}
