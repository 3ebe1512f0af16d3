//! # quiver-chaos — fault injection and drills
//!
//! Filled in by the fault-tolerance issue.
