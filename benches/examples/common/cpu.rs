//! Shared by the examples (`#[path]`-included): this process's CPU time.

/// Process CPU time (user + system, every thread) in seconds, from `/proc/self/stat` (100 Hz
/// ticks; 0 where there is no procfs).
pub fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // The fields after the command name (which may hold spaces) start after its closing ')';
    // utime and stime are the line's 14th and 15th, the 12th and 13th after the name.
    let fields: Vec<&str> = stat.rsplit_once(')').map(|(_, r)| r.split_whitespace().collect()).unwrap_or_default();
    let tick = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (tick(11) + tick(12)) / 100.0
}
