//! What the router and its loadgen both need from the host, without the router itself:
//! the loadgen links this, not the router's library.
//!
//! Layout:
//! - [`sched`]: short time slices for latency-critical threads (Linux's EEVDF scheduler).

pub mod sched;
