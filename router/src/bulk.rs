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

pub use swarmbus_host::sched::{request_short_slice, SHORT_SLICE};

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
