//! Thread scheduling the router and the loadgen both ask for.

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

#[cfg(test)]
mod tests {
    use super::*;

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
}
