//! The bulk runtime: where telemetry and job traffic is read and written, on threads the
//! operating system schedules below the router's main runtime.
//!
//! tokio has no task priorities: a command waits in the same run queue as every telemetry
//! task that is ready, and under a flood of 200 sessions that queue is long. The one
//! scheduler that can put a command first is the kernel's, so bulk work runs on threads of
//! its own with a lower priority (nice 10 by default). When the main runtime has work (a
//! command, a control message, an acknowledgement) the kernel gives it most of the CPU. A
//! bulk reader that gets less CPU reads its streams more slowly, and QUIC flow control then
//! holds the flooding senders back.
//!
//! What stays on the main runtime: the QUIC endpoint and every connection's driver (one
//! connection carries all classes of a session), the session streams, command, control,
//! alert and reconciliation streams, the shards and the control plane. Bulk and main
//! threads share locks (a connection's QUIC state, an outbox lane), which is why the bulk
//! threads are niced rather than `SCHED_IDLE`: a bulk thread preempted while holding one
//! must get the CPU back soon.

use std::sync::mpsc;

use tokio::runtime::Handle;

use crate::config::BulkPriority;

/// A running bulk runtime. Dropping the last clone of its owner stops it (on a thread of
/// its own, so dropping it from async code or from one of its own tasks is safe).
#[derive(Debug)]
pub struct BulkRuntime {
    handle: Handle,
    threads: usize,
    _stop: Option<mpsc::Sender<()>>,
}

impl BulkRuntime {
    /// Starts `threads` worker threads (at least one) scheduled at `priority` (Linux;
    /// elsewhere the priority is left alone).
    /// With [`BulkPriority::Shared`] no threads are started: bulk work runs on the runtime
    /// this is called on.
    pub fn start(threads: usize, priority: BulkPriority) -> std::io::Result<BulkRuntime> {
        if priority == BulkPriority::Shared {
            return Ok(BulkRuntime {
                handle: Handle::try_current().map_err(std::io::Error::other)?,
                threads: 0,
                _stop: None,
            });
        }
        let threads = threads.max(1);
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .thread_name("swarmbus-bulk")
            .on_thread_start(move || lower_thread_priority(priority))
            .enable_all()
            .build()?;
        let handle = runtime.handle().clone();
        let (stop, stopped) = mpsc::channel::<()>();
        std::thread::Builder::new()
            .name("swarmbus-bulk-owner".into())
            .spawn(move || {
                // Returns once every sender is gone; the runtime is then dropped here,
                // outside any async context.
                let _ = stopped.recv();
                runtime.shutdown_background();
            })?;
        Ok(BulkRuntime {
            handle,
            threads,
            _stop: Some(stop),
        })
    }

    pub fn handle(&self) -> &Handle {
        &self.handle
    }

    /// Threads of its own (0 when bulk work shares the main runtime).
    pub fn threads(&self) -> usize {
        self.threads
    }
}

/// Lowers the calling thread's scheduling priority to `priority` (Linux schedules threads
/// one by one; a no-op elsewhere and for `shared`). Best effort: lowering needs no
/// privilege, but if it fails the thread keeps its priority.
#[allow(unsafe_code)] // one libc call with integer arguments; no memory is shared
pub(crate) fn lower_thread_priority(priority: BulkPriority) {
    #[cfg(target_os = "linux")]
    if let BulkPriority::Nice(nice) = priority {
        // SAFETY: setpriority only reads its integer arguments; who = 0 is the calling
        // thread on Linux.
        let _ = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, nice) };
    }
    #[cfg(not(target_os = "linux"))]
    let _ = priority;
}

/// The time slice the router asks the kernel for on its latency-critical threads (the
/// main runtime's workers, the log writers): see [`request_short_slice`].
pub const SHORT_SLICE: std::time::Duration = std::time::Duration::from_micros(100);

/// Asks the kernel to give the calling thread short time slices (Linux 6.12 and later:
/// the EEVDF scheduler's per-thread slice, `sched_setattr` with `sched_runtime`), keeping
/// its policy (`SCHED_OTHER`) and nice value. A thread with a shorter slice than the one
/// running preempts it as soon as it wakes, instead of waiting until the running thread's
/// slice, or the next timer tick (4 ms at 250 Hz), is over: a command's thread that wakes
/// while a niced bulk thread runs gets the CPU at once. Needs no privilege. Returns whether
/// the kernel took the request: older kernels ignore it, other systems lack it, and a
/// thread with another policy than `SCHED_OTHER` (set by `chrt`) is left as it is.
#[allow(unsafe_code)] // system calls with a struct of the kernel's layout
pub fn request_short_slice(slice: std::time::Duration) -> bool {
    #[cfg(target_os = "linux")]
    {
        /// `struct sched_attr`, as of Linux 4.19 (SCHED_ATTR_SIZE_VER1).
        #[repr(C)]
        struct SchedAttr {
            size: u32,
            sched_policy: u32,
            sched_flags: u64,
            sched_nice: i32,
            sched_priority: u32,
            sched_runtime: u64,
            sched_deadline: u64,
            sched_period: u64,
            sched_util_min: u32,
            sched_util_max: u32,
        }
        // SAFETY: sched_getscheduler reads its integer argument only; 0 is this thread.
        if unsafe { libc::sched_getscheduler(0) } != libc::SCHED_OTHER {
            // A thread the operator gave another policy (chrt) keeps it.
            return false;
        }
        // SAFETY: getpriority reads its integer arguments only; who = 0 is this thread.
        let nice = unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) };
        let attr = SchedAttr {
            size: std::mem::size_of::<SchedAttr>() as u32,
            sched_policy: libc::SCHED_OTHER as u32,
            sched_flags: 0,
            sched_nice: nice,
            sched_priority: 0,
            sched_runtime: slice.as_nanos().min(u128::from(u64::MAX)) as u64,
            sched_deadline: 0,
            sched_period: 0,
            sched_util_min: 0,
            sched_util_max: 0,
        };
        // SAFETY: the kernel reads `attr.size` bytes from a live, initialised struct of
        // that size; pid 0 is the calling thread; flags 0.
        let result =
            unsafe { libc::syscall(libc::SYS_sched_setattr, 0, &attr as *const SchedAttr, 0) };
        if result != 0 {
            return false;
        }
        // Kernels before 6.12 accept the call but ignore `sched_runtime` for SCHED_OTHER:
        // read it back to tell.
        let mut current = SchedAttr { ..attr };
        // SAFETY: the kernel writes at most `size` bytes into a live struct of that size;
        // pid 0 is the calling thread; flags 0.
        let read = unsafe {
            libc::syscall(
                libc::SYS_sched_getattr,
                0,
                &mut current as *mut SchedAttr,
                std::mem::size_of::<SchedAttr>() as u32,
                0,
            )
        };
        read == 0 && current.sched_runtime == attr.sched_runtime
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = slice;
        false
    }
}

/// Aborts a task when dropped: a bulk task started for a connection ends with the task
/// that started it.
#[derive(Debug)]
pub struct AbortOnDrop<T>(pub tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn runs_tasks_and_stops_when_dropped_from_async_code() {
        let bulk = BulkRuntime::start(1, BulkPriority::Nice(10)).unwrap();
        let answer = bulk.handle().spawn(async { 6 * 7 }).await.unwrap();
        assert_eq!(answer, 42);
        // A task that would run for ever is cancelled with the runtime; dropping it here,
        // inside another runtime, must not panic.
        let forever = bulk.handle().spawn(std::future::pending::<()>());
        drop(bulk);
        assert!(forever.await.unwrap_err().is_cancelled());
    }

    #[cfg(target_os = "linux")]
    #[allow(unsafe_code)] // reads the calling thread's nice value
    #[tokio::test]
    async fn threads_run_at_the_configured_priority() {
        let nice = || unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) };
        let niced = BulkRuntime::start(1, BulkPriority::Nice(7)).unwrap();
        let n = niced.handle().spawn(async move { nice() }).await.unwrap();
        assert!(n >= 7, "nice {n}");
        // Shared: no threads of its own, the caller's runtime.
        let shared = BulkRuntime::start(4, BulkPriority::Shared).unwrap();
        assert_eq!(shared.threads(), 0);
        assert_eq!(shared.handle().id(), tokio::runtime::Handle::current().id());
    }

    #[cfg(target_os = "linux")]
    #[allow(unsafe_code)] // reads the calling thread's scheduling policy and nice value
    #[test]
    fn a_short_slice_keeps_the_threads_policy_and_nice_value() {
        std::thread::spawn(|| {
            // SAFETY: integer arguments only; who = 0 / pid 0 is this thread.
            unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, 3) };
            let took = request_short_slice(SHORT_SLICE);
            let nice = unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) };
            let policy = unsafe { libc::sched_getscheduler(0) };
            assert_eq!((nice, policy), (3, libc::SCHED_OTHER), "took: {took}");
            // Kernels from 6.12 on keep the slice asked for.
            let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
            let mut numbers = release
                .split(|c: char| !c.is_ascii_digit())
                .filter_map(|n| n.parse::<u32>().ok());
            let version = (numbers.next().unwrap_or(0), numbers.next().unwrap_or(0));
            if version >= (6, 12) {
                assert!(took, "kernel {release}");
            }
        })
        .join()
        .unwrap();
    }

    #[tokio::test]
    async fn abort_on_drop_cancels_the_task() {
        let bulk = BulkRuntime::start(1, BulkPriority::Nice(0)).unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let guard = AbortOnDrop(bulk.handle().spawn(async move {
            let _tx = tx;
            std::future::pending::<()>().await
        }));
        drop(guard);
        // The sender is dropped with the aborted task.
        assert!(rx.await.is_err());
    }
}
