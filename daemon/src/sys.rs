//! Small facts about this process that the CLI reports (peak memory) and terminal detection.

use std::io::IsTerminal;

/// Peak resident set size of this process in bytes (`VmHWM` from `/proc/self/status`), if known.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// UDP datagrams this host's kernel dropped so far because a socket's receive buffer was full
/// (`RcvbufErrors` of IPv4 and IPv6 in `/proc/net/snmp` and `/proc/net/snmp6`), for every socket
/// of this network namespace; `None` where neither file can be read.
pub fn udp_receive_buffer_errors() -> Option<u64> {
    let v4 = std::fs::read_to_string("/proc/net/snmp").ok().and_then(|t| snmp_counter(&t, "Udp:", "RcvbufErrors"));
    let v6 = std::fs::read_to_string("/proc/net/snmp6").ok().and_then(|t| {
        let line = t.lines().find(|l| l.split_whitespace().next() == Some("Udp6RcvbufErrors"))?;
        line.split_whitespace().nth(1)?.parse().ok()
    });
    if v4.is_none() && v6.is_none() { None } else { Some(v4.unwrap_or(0) + v6.unwrap_or(0)) }
}

/// Counter `name` of protocol `proto` (`"Udp:"`) in `/proc/net/snmp`'s text: a header line of
/// names followed by a line of values, both starting with the protocol.
fn snmp_counter(text: &str, proto: &str, name: &str) -> Option<u64> {
    let mut lines = text.lines().filter(|l| l.starts_with(proto));
    let (names, values) = (lines.next()?, lines.next()?);
    let at = names.split_whitespace().position(|n| n == name)?;
    values.split_whitespace().nth(at)?.parse().ok()
}

/// CPU time (user + system) that process `pid` (this one when `None`) has used, in seconds, from
/// `/proc/PID/stat`; `None` where that file cannot be read.
pub fn cpu_seconds(pid: Option<u32>) -> Option<f64> {
    let path = pid.map_or_else(|| "/proc/self/stat".to_owned(), |p| format!("/proc/{p}/stat"));
    let stat = std::fs::read_to_string(path).ok()?;
    // Fields after the command name (which may hold spaces, so split after its closing ')'):
    // state is the first, utime the 12th, stime the 13th.
    let mut fields = stat.rsplit_once(')')?.1.split_whitespace().skip(11);
    let utime: f64 = fields.next()?.parse().ok()?;
    let stime: f64 = fields.next()?.parse().ok()?;
    Some((utime + stime) / clock_ticks())
}

/// CPU time (user + system) of this process's children that have ended and been waited for, in
/// seconds (`getrusage(RUSAGE_CHILDREN)`): the difference around one `Command::output` is that
/// child's CPU time.
pub fn children_cpu_seconds() -> Option<f64> {
    // SAFETY: all-zero bytes are a valid `rusage`, and getrusage only writes the struct we pass.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `ru` is a valid, writable `rusage`.
    if unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru) } != 0 {
        return None;
    }
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    Some(secs(ru.ru_utime) + secs(ru.ru_stime))
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if hz > 0 { hz as f64 } else { 100.0 }
}

/// The machine's CPU time so far by kind, from the first line of `/proc/stat`, in seconds summed
/// over CPUs: `(all, idle, steal)`. Steal is time the hypervisor gave this VM's CPUs to others.
pub fn host_cpu_seconds() -> Option<(f64, f64, f64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().next()?.strip_prefix("cpu ")?;
    let v: Vec<f64> = line.split_whitespace().map_while(|f| f.parse().ok()).collect();
    // user nice system idle iowait irq softirq steal [guest guest_nice, already in user/nice]
    let all: f64 = v.iter().take(8).sum();
    let (idle, steal) = (v.get(3)? + v.get(4).copied().unwrap_or(0.0), v.get(7).copied().unwrap_or(0.0));
    let hz = clock_ticks();
    Some((all / hz, idle / hz, steal / hz))
}

/// A spinner with a message on a terminal; plain lines on stderr otherwise (logs, CI, pipes).
pub struct Progress {
    bar: Option<indicatif::ProgressBar>,
    quiet: bool,
}

impl Progress {
    /// Starts reporting; `quiet` (e.g. `--json`) suppresses the plain lines but keeps a terminal spinner.
    pub fn new(quiet: bool) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = indicatif::ProgressBar::new_spinner();
            bar.enable_steady_tick(std::time::Duration::from_millis(120));
            bar
        });
        Self { bar, quiet }
    }

    /// Announces the current step.
    pub fn step(&self, message: impl Into<String>) {
        let message = message.into();
        match &self.bar {
            Some(bar) => bar.set_message(message),
            None if !self.quiet => eprintln!("{message}"),
            None => {}
        }
    }

    /// Clears the spinner.
    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.finish();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snmp_counters_are_read_by_name_under_their_protocol() {
        let text = "Ip: Forwarding DefaultTTL\nIp: 1 64\n\
                    Udp: InDatagrams NoPorts InErrors OutDatagrams RcvbufErrors SndbufErrors\n\
                    Udp: 34830 0 2477 37309 2466 3\n\
                    UdpLite: InDatagrams NoPorts InErrors OutDatagrams RcvbufErrors SndbufErrors\n\
                    UdpLite: 0 0 0 0 7 0\n";
        assert_eq!(snmp_counter(text, "Udp:", "RcvbufErrors"), Some(2466));
        assert_eq!(snmp_counter(text, "UdpLite:", "RcvbufErrors"), Some(7));
        assert_eq!(snmp_counter(text, "Udp:", "NoSuchCounter"), None);
        assert_eq!(snmp_counter(text, "Tcp:", "RcvbufErrors"), None);
        assert_eq!(snmp_counter("Udp: RcvbufErrors\n", "Udp:", "RcvbufErrors"), None, "no value line");
    }

    #[test]
    fn this_host_reports_its_udp_drops() {
        // Linux always has /proc/net/snmp; the count only grows.
        let a = udp_receive_buffer_errors().expect("/proc/net/snmp");
        assert!(udp_receive_buffer_errors().expect("/proc/net/snmp") >= a);
    }
}
