//! CPU seconds spent by the loadgen and by the process it measures (a spawned router or
//! forwarder, or `--router-pid`), over a scenario's measured phase: the figures only mean
//! something when the loadgen is not itself the limit.

use std::time::Instant;

/// CPU seconds (user + system) of this process, all threads.
fn own_cpu_s() -> Option<f64> {
    process_cpu_s(std::process::id())
}

/// CPU seconds (user + system) of process `pid`, all threads, from `/proc/PID/stat`
/// (Linux only; `None` elsewhere or once the process is gone). Clock ticks are 10 ms on
/// common kernels: fine for runs of seconds.
fn process_cpu_s(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat_cpu_ticks(&stat).map(|t| t as f64 / clock_ticks_per_s())
}

#[allow(unsafe_code)] // sysconf with an integer argument; no memory is shared
fn clock_ticks_per_s() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 {
        ticks as f64
    } else {
        100.0
    }
}

/// utime + stime, in clock ticks, from a `/proc/PID/stat` line. The command name (field 2)
/// is in parentheses and may hold spaces, so fields are counted from its closing one.
fn parse_stat_cpu_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    // After the name: state is field 3, utime field 14, stime field 15.
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// CPU use from [`CpuMeter::start`] to [`CpuMeter::report`].
#[derive(Debug)]
pub struct CpuMeter {
    started: Instant,
    own: Option<f64>,
    target: Option<(u32, Option<f64>)>,
    target_name: &'static str,
}

impl CpuMeter {
    /// Starts measuring this process and, when known, `target` (the process under test,
    /// named `target_name` in the report: "router" or "forwarder").
    pub fn start(target: Option<u32>, target_name: &'static str) -> CpuMeter {
        CpuMeter {
            started: Instant::now(),
            own: own_cpu_s(),
            target: target.map(|pid| (pid, process_cpu_s(pid))),
            target_name,
        }
    }

    /// The CPU seconds each side spent since the start, as a JSON object:
    /// `{"wall_s", "loadgen_s", "<target>_s", "loadgen_below_<target>"}`; the target's
    /// fields are null when its process is not known (a router given by address without
    /// `--router-pid`).
    pub fn report(&self) -> serde_json::Value {
        let wall = self.started.elapsed().as_secs_f64();
        let own = own_cpu_s()
            .zip(self.own)
            .map(|(now, then)| round3(now - then));
        let target = self
            .target
            .and_then(|(pid, then)| process_cpu_s(pid).zip(then))
            .map(|(now, then)| round3(now - then));
        let mut report = serde_json::Map::new();
        report.insert("wall_s".into(), round3(wall).into());
        report.insert("loadgen_s".into(), own.into());
        report.insert(format!("{}_s", self.target_name), target.into());
        let below = own.zip(target).map(|(own, target)| own < target);
        report.insert(format!("loadgen_below_{}", self.target_name), below.into());
        serde_json::Value::Object(report)
    }
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// A line for stderr when the loadgen spent more CPU than the process it measured: its
/// figures may show the loadgen's limit, not the router's.
pub fn warn_if_loadgen_bound(cpu: &serde_json::Value) {
    for (key, value) in cpu.as_object().into_iter().flatten() {
        if key.starts_with("loadgen_below_") && value == &serde_json::Value::Bool(false) {
            eprintln!(
                "note: the loadgen spent more CPU ({} s) than the {} it measured ({} s): the figures may be the loadgen's limit",
                cpu["loadgen_s"],
                &key["loadgen_below_".len()..],
                cpu[format!("{}_s", &key["loadgen_below_".len()..])]
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_lines_give_user_plus_system_ticks() {
        let line = "4242 (swarmbus router) S 1 4242 4242 0 -1 4194560 1234 0 0 0 150 25 0 0 20 0 9 0 1000 0 0";
        assert_eq!(parse_stat_cpu_ticks(line), Some(175));
        assert_eq!(parse_stat_cpu_ticks("4242 (x) S 1"), None);
        assert_eq!(parse_stat_cpu_ticks("garbage"), None);
    }

    #[test]
    fn this_process_is_measured() {
        let meter = CpuMeter::start(Some(std::process::id()), "router");
        // Burn a little CPU so both readings move on any clock-tick granularity.
        let until = Instant::now() + std::time::Duration::from_millis(50);
        let mut x = 0u64;
        while Instant::now() < until {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
        }
        std::hint::black_box(x);
        let report = meter.report();
        if cfg!(target_os = "linux") {
            // Clock ticks are 10 ms: a busy host may not have run this loop for one.
            assert!(report["loadgen_s"].as_f64().unwrap() >= 0.0, "{report}");
            assert!(report["router_s"].as_f64().is_some(), "{report}");
            assert!(report["loadgen_below_router"].is_boolean(), "{report}");
        }
        let none = CpuMeter::start(None, "router").report();
        assert!(none["router_s"].is_null() && none["loadgen_below_router"].is_null());
    }
}
