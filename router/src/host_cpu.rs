//! The host's idle CPU share, read from `/proc/stat`, sampled for the governor
//! ([`swarmbus_proto::governor`]).

/// The host's CPU time, from `/proc/stat`.
#[derive(Debug)]
pub struct HostCpu {
    last: Option<(u64, u64)>,
}

impl HostCpu {
    /// None where `/proc/stat` cannot be read (not Linux).
    pub fn open() -> Option<Self> {
        let first = read_proc_stat()?;
        Some(HostCpu { last: Some(first) })
    }

    /// The idle share of the CPU time since the last call (0 to 1).
    pub fn idle_since_last(&mut self) -> Option<f64> {
        let now = read_proc_stat()?;
        let previous = self.last.replace(now)?;
        let idle = now.0.saturating_sub(previous.0) as f64;
        let total = now.1.saturating_sub(previous.1) as f64;
        (total > 0.0).then(|| (idle / total).clamp(0.0, 1.0))
    }
}

fn read_proc_stat() -> Option<(u64, u64)> {
    let text = std::fs::read_to_string("/proc/stat").ok()?;
    parse_cpu_line(text.lines().next()?)
}

/// (idle, total) jiffies from the `cpu` line of `/proc/stat`: idle counts idle and iowait;
/// the total is user to steal (guest time is already inside user and nice).
pub fn parse_cpu_line(line: &str) -> Option<(u64, u64)> {
    let mut fields = line.split_whitespace();
    if fields.next()? != "cpu" {
        return None;
    }
    let values: Vec<u64> = fields
        .take(8)
        .map(|field| field.parse().ok())
        .collect::<Option<_>>()?;
    if values.len() < 5 {
        return None;
    }
    let idle = values[3] + values[4];
    Some((idle, values.iter().sum()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn proc_stat_lines_parse_and_the_host_is_sampled() {
        assert_eq!(
            parse_cpu_line("cpu  100 20 30 400 50 6 7 8 9 10"),
            Some((450, 621))
        );
        assert_eq!(parse_cpu_line("cpu0 1 2 3 4 5 6 7 8"), None);
        assert_eq!(parse_cpu_line("cpu 1 2 x 4 5"), None);
        assert_eq!(parse_cpu_line("cpu 1 2 3"), None);
        if cfg!(target_os = "linux") {
            let mut host = HostCpu::open().expect("/proc/stat on Linux");
            std::thread::sleep(Duration::from_millis(30));
            if let Some(idle) = host.idle_since_last() {
                assert!((0.0..=1.0).contains(&idle), "{idle}");
            }
        }
    }
}
