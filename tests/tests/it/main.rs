//! The one integration-test binary of the workspace; each area adds a module.

mod cli;
mod cluster;
mod jobs;
mod raft_sim;
mod serve;
