//! [`PartialFrames`]: bytes of frames a connection has started and not finished, counted as
//! they arrive against the connection's cap (`limits.partial_frame_bytes`) and the router's
//! (`limits.router_partial_frame_bytes`). QUIC flow control bounds only what the router has
//! not read yet; what it has read into an unfinished frame is counted here. A few atomics,
//! taken per received chunk, never per message. (The swarm budget is the protocol's:
//! `swarmbus_proto::quota`.)

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// The router-wide side of [`PartialFrames`].
#[derive(Debug)]
pub struct RouterPartialFrames {
    held: AtomicUsize,
    cap: usize,
}

impl RouterPartialFrames {
    pub fn new(cap: usize) -> Arc<Self> {
        Arc::new(RouterPartialFrames {
            held: AtomicUsize::new(0),
            cap,
        })
    }

    /// Bytes held in unfinished frames across the router.
    pub fn held(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }
}

/// Why bytes could not be charged.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PartialRefused {
    /// The connection's unfinished frames would hold more than its cap.
    Connection { held: usize, cap: usize },
    /// The router's unfinished frames would hold more than its cap.
    Router { cap: usize },
}

impl std::fmt::Display for PartialRefused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PartialRefused::Connection { held, cap } => write!(
                f,
                "unfinished frames on this connection would hold {held} bytes \
                 (limits.partial_frame_bytes = {cap})"
            ),
            PartialRefused::Router { cap } => write!(
                f,
                "unfinished frames across the router would hold more than {cap} bytes \
                 (limits.router_partial_frame_bytes); retry later"
            ),
        }
    }
}

/// One connection's budget for unfinished frames (shared by its stream readers).
#[derive(Debug)]
pub struct PartialFrames {
    held: AtomicUsize,
    cap: usize,
    router: Arc<RouterPartialFrames>,
}

impl PartialFrames {
    pub fn new(cap: usize, router: Arc<RouterPartialFrames>) -> Arc<Self> {
        Arc::new(PartialFrames {
            held: AtomicUsize::new(0),
            cap,
            router,
        })
    }

    /// Moves a reader's charge from `from` bytes to `to`. A rise past either cap is
    /// refused and leaves the charge at `from`.
    pub fn recharge(&self, from: usize, to: usize) -> Result<(), PartialRefused> {
        if to <= from {
            self.give_back(from - to);
            return Ok(());
        }
        let more = to - from;
        let held = self.held.fetch_add(more, Ordering::Relaxed) + more;
        if held > self.cap {
            self.held.fetch_sub(more, Ordering::Relaxed);
            return Err(PartialRefused::Connection {
                held,
                cap: self.cap,
            });
        }
        let router_held = self.router.held.fetch_add(more, Ordering::Relaxed) + more;
        if router_held > self.router.cap {
            self.router.held.fetch_sub(more, Ordering::Relaxed);
            self.held.fetch_sub(more, Ordering::Relaxed);
            return Err(PartialRefused::Router {
                cap: self.router.cap,
            });
        }
        Ok(())
    }

    /// Gives back `bytes` a reader held (its frame finished, or the reader ended).
    pub fn give_back(&self, bytes: usize) {
        if bytes > 0 {
            self.held.fetch_sub(bytes, Ordering::Relaxed);
            self.router.held.fetch_sub(bytes, Ordering::Relaxed);
        }
    }

    pub fn held(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partial_frames_are_capped_per_connection_and_router_wide() {
        let router = RouterPartialFrames::new(300);
        let a = PartialFrames::new(200, router.clone());
        let b = PartialFrames::new(200, router.clone());
        assert_eq!(a.recharge(0, 150), Ok(()));
        assert_eq!(
            a.recharge(150, 201),
            Err(PartialRefused::Connection {
                held: 201,
                cap: 200
            })
        );
        assert_eq!(a.held(), 150);
        assert_eq!(b.recharge(0, 150), Ok(()));
        assert_eq!(
            b.recharge(150, 151),
            Err(PartialRefused::Router { cap: 300 })
        );
        assert_eq!((b.held(), router.held()), (150, 300));
        // A finished frame gives its bytes back, to both.
        a.recharge(150, 10).unwrap();
        assert_eq!((a.held(), router.held()), (10, 160));
        assert_eq!(b.recharge(150, 190), Ok(()));
        a.give_back(10);
        b.give_back(190);
        assert_eq!(router.held(), 0);
    }
}
