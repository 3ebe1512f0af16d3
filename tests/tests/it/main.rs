//! The one integration-test binary of the workspace; each area adds a module.

mod chaos;
mod cli;
mod cluster;
mod deploy;
mod jobs;
mod raft_sim;
mod security;
mod serve;
mod ui;
