//! Reloading a running router from the command line: `swarmbus-router reload --data-dir DIR`
//! signals the router that runs on that data dir (its pid is in `DATA_DIR/router.pid`,
//! written at start and removed at shutdown) and waits for the outcome, which the router
//! writes to `DATA_DIR/reload.json` after every reload, however it was asked for (SIGHUP).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// Where a running router keeps its pid.
pub fn pid_path(data_dir: &Path) -> PathBuf {
    data_dir.join("router.pid")
}

/// Where a router writes the outcome of its last reload.
pub fn report_path(data_dir: &Path) -> PathBuf {
    data_dir.join("reload.json")
}

/// The outcome of one reload, as `DATA_DIR/reload.json` holds it.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ReloadReport {
    /// The router process that reloaded.
    pub pid: u32,
    /// Its reloads since it started, this one included.
    pub sequence: u64,
    /// When it finished, Unix ms.
    pub at_ms: u64,
    /// The server certificate and key: `reloaded`, `unchanged` (the development CA), or
    /// why not.
    pub tls: String,
    /// Keys, revocations, policy, client CA and CRLs: `reloaded`, `off` (`auth.mode =
    /// "none"`), or why not.
    pub auth: String,
    /// Sessions the reload closed.
    pub closed: usize,
    /// Whether every part reloaded (a part that failed kept what it had).
    pub ok: bool,
}

impl ReloadReport {
    /// Writes the report where `reload` reads it (written aside, then renamed).
    pub fn write(&self, data_dir: &Path) -> std::io::Result<()> {
        let path = report_path(data_dir);
        let aside = path.with_extension("json.tmp");
        let text = serde_json::to_string(self).map_err(std::io::Error::other)?;
        std::fs::write(&aside, text + "\n")?;
        std::fs::rename(&aside, &path)
    }

    fn read(data_dir: &Path) -> Option<ReloadReport> {
        let text = std::fs::read_to_string(report_path(data_dir)).ok()?;
        serde_json::from_str(&text).ok()
    }
}

/// `DATA_DIR/router.pid` while the router runs: written at start, removed when dropped.
#[derive(Debug)]
pub struct PidFile(PathBuf);

impl PidFile {
    pub fn write(data_dir: &Path) -> std::io::Result<PidFile> {
        let path = pid_path(data_dir);
        std::fs::write(&path, format!("{}\n", std::process::id()))?;
        Ok(PidFile(path))
    }
}

impl Drop for PidFile {
    fn drop(&mut self) {
        // Another router may have started on the data dir since: leave its pid alone.
        let ours = std::fs::read_to_string(&self.0)
            .is_ok_and(|text| text.trim() == std::process::id().to_string());
        if ours {
            let _ = std::fs::remove_file(&self.0);
        }
    }
}

/// Signals the router running on `data_dir` to reload and waits up to `timeout` for its
/// report. Fails when no router runs there, when the pid is not a swarmbus router's, or
/// when no report comes in time.
pub fn signal_reload(data_dir: &Path, timeout: Duration) -> anyhow::Result<ReloadReport> {
    use anyhow::Context;
    let pid_file = pid_path(data_dir);
    let text = std::fs::read_to_string(&pid_file).with_context(|| {
        format!(
            "reading {}: is a router running on this data dir?",
            pid_file.display()
        )
    })?;
    let pid: u32 = text
        .trim()
        .parse()
        .with_context(|| format!("{} does not hold a pid", pid_file.display()))?;
    check_is_router(pid)?;
    let before = ReloadReport::read(data_dir)
        .filter(|report| report.pid == pid)
        .map_or(0, |report| report.sequence);
    send_hangup(pid)?;
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(report) = ReloadReport::read(data_dir) {
            if report.pid == pid && report.sequence > before {
                return Ok(report);
            }
        }
        if Instant::now() >= deadline {
            anyhow::bail!(
                "router {pid} wrote no reload report to {} within {timeout:?}; see its log",
                report_path(data_dir).display()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Refuses a pid that is not a running swarmbus-router (a stale pid file whose pid was
/// reused): on Linux by the process's name.
fn check_is_router(pid: u32) -> anyhow::Result<()> {
    let comm = Path::new("/proc").join(pid.to_string()).join("comm");
    match std::fs::read_to_string(&comm) {
        Ok(name) if name.trim().starts_with("swarmbus-router") => Ok(()),
        Ok(name) => anyhow::bail!(
            "process {pid} is {:?}, not a swarmbus-router: the pid file is stale",
            name.trim()
        ),
        Err(_) if Path::new("/proc/self").exists() => {
            anyhow::bail!("no process {pid}: the router is not running (a stale pid file)")
        }
        // No /proc (not Linux): the signal itself says whether the process exists.
        Err(_) => Ok(()),
    }
}

#[cfg(unix)]
#[allow(unsafe_code)] // kill(2) with integer arguments; no memory is shared
fn send_hangup(pid: u32) -> anyhow::Result<()> {
    let pid =
        libc::pid_t::try_from(pid).map_err(|_| anyhow::anyhow!("pid {pid} is out of range"))?;
    // SAFETY: kill takes two integers and touches no memory of this process.
    if unsafe { libc::kill(pid, libc::SIGHUP) } != 0 {
        let error = std::io::Error::last_os_error();
        anyhow::bail!("signalling router {pid}: {error}");
    }
    Ok(())
}

#[cfg(not(unix))]
fn send_hangup(pid: u32) -> anyhow::Result<()> {
    anyhow::bail!("reloading router {pid} needs SIGHUP, which this system does not have")
}
