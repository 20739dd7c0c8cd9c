//! A session's receivers as Python receives share them: what a cancelled receive had
//! already taken goes back, and comes out first.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::pin;
use std::sync::{Arc, Mutex as StdMutex};
use std::task::{Context, Poll, Waker};

use pyo3::exceptions::PyStopAsyncIteration;
use pyo3::prelude::*;
use swarmbus_client::{Deliveries, JobEvent, JobEvents, JobUpdates, Requests};
use swarmbus_schema::{Deliver, JobUpdate, Request};
use tokio::sync::{Mutex, Notify};

/// A receiver of the client's.
pub(crate) trait Source: Send + 'static {
    type Item: Send + 'static;
    /// The next item, or `Ready(None)` once the stream ended.
    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<Self::Item>>;
}

impl Source for Deliveries {
    type Item = Deliver;
    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<Deliver>> {
        self.poll_recv(cx)
    }
}

// The job streams offer `recv` only: one poll of a fresh `recv` future is a poll of the
// channel (dropping a pending one loses nothing: tokio's `recv` is cancel-safe).
impl Source for JobUpdates {
    type Item = JobUpdate;
    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<JobUpdate>> {
        pin!(self.recv()).poll(cx)
    }
}

impl Source for Requests {
    type Item = Request;
    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<Request>> {
        pin!(self.recv()).poll(cx)
    }
}

impl Source for JobEvents {
    type Item = JobEvent;
    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<JobEvent>> {
        pin!(self.recv()).poll(cx)
    }
}

/// One receiver and the items given back to it, oldest first.
#[derive(Debug)]
pub(crate) struct Inbox<S: Source> {
    source: Mutex<S>,
    returned: StdMutex<VecDeque<S::Item>>,
    given_back: Notify,
}

impl<S: Source> Inbox<S> {
    pub(crate) fn new(source: S) -> Arc<Self> {
        Arc::new(Inbox {
            source: Mutex::new(source),
            returned: StdMutex::new(VecDeque::new()),
            given_back: Notify::new(),
        })
    }

    fn returned(&self) -> std::sync::MutexGuard<'_, VecDeque<S::Item>> {
        crate::lock(&self.returned)
    }

    fn take_returned(&self, limit: usize, into: &mut Vec<S::Item>) {
        let mut returned = self.returned();
        while into.len() < limit {
            match returned.pop_front() {
                Some(item) => into.push(item),
                None => break,
            }
        }
    }

    /// Up to `limit` items without waiting, given-back ones first: `None` when there is
    /// none yet (or another receive is waiting on the receiver), `Some(empty)` once the
    /// stream ended. Most receives under load find one there: answered on the spot, they
    /// save the hop to the runtime and back.
    pub(crate) fn ready_now(&self, limit: usize) -> Option<Vec<S::Item>> {
        let limit = limit.max(1);
        let mut items = Vec::new();
        self.take_returned(limit, &mut items);
        if items.len() < limit {
            if let Ok(mut source) = self.source.try_lock() {
                let ended = drain_ready(&mut *source, limit, &mut items);
                if ended && items.is_empty() {
                    return Some(items);
                }
            }
        }
        (!items.is_empty()).then_some(items)
    }

    /// Waits for at least one item (given-back ones first), then takes what else is
    /// there, up to `limit`; empty once the stream ended.
    pub(crate) async fn next(&self, limit: usize) -> Vec<S::Item> {
        let limit = limit.max(1);
        let mut source = self.source.lock().await;
        let mut items = Vec::new();
        loop {
            self.take_returned(limit, &mut items);
            if !items.is_empty() {
                break;
            }
            let arrived = tokio::select! {
                item = std::future::poll_fn(|cx| source.poll_next(cx)) => item,
                () = self.given_back.notified() => continue,
            };
            match arrived {
                None => return items,
                Some(item) => {
                    // Items given back meanwhile are older: they go first.
                    self.take_returned(limit, &mut items);
                    if items.len() < limit {
                        items.push(item);
                    } else {
                        self.returned().push_back(item);
                    }
                }
            }
            break;
        }
        drain_ready(&mut *source, limit, &mut items);
        items
    }

    /// Items a cancelled receive had taken, in the order it took them.
    pub(crate) fn give_back(&self, items: impl IntoIterator<Item = S::Item>) {
        self.returned().extend(items);
        // A permit, if nobody waits yet: the next wait then looks again at once.
        self.given_back.notify_one();
    }
}

/// Takes what `source` has ready, without waiting, until `items` holds `limit`; whether
/// the stream ended.
fn drain_ready<S: Source>(source: &mut S, limit: usize, items: &mut Vec<S::Item>) -> bool {
    let mut context = Context::from_waker(Waker::noop());
    while items.len() < limit {
        match source.poll_next(&mut context) {
            Poll::Ready(Some(item)) => items.push(item),
            Poll::Ready(None) => return true,
            Poll::Pending => break,
        }
    }
    false
}

/// `Some(stream)` once taken (the first call takes it), `None` if the session has none.
pub(crate) fn taken<S: Source>(
    slot: &StdMutex<Option<Arc<Inbox<S>>>>,
    take: impl FnOnce() -> Option<S>,
) -> Option<Arc<Inbox<S>>> {
    let mut slot = crate::lock(slot);
    if slot.is_none() {
        *slot = take().map(Inbox::new);
    }
    slot.clone()
}

/// The next item of a stream as Python gets it (the end of the iteration once the stream
/// ended), for an iterator's `__anext__`; one a cancelled `__anext__` took goes back.
pub(crate) fn next_item<'py, S: Source>(
    py: Python<'py>,
    inbox: &Arc<Inbox<S>>,
    to_python: fn(Python<'_>, S::Item) -> PyResult<Py<PyAny>>,
) -> PyResult<Bound<'py, PyAny>> {
    let (taker, giver) = (inbox.clone(), inbox.clone());
    crate::bridge::spawn_with(
        py,
        async move {
            taker
                .next(1)
                .await
                .pop()
                .ok_or_else(|| PyStopAsyncIteration::new_err(()))
                .map(|item| (item, to_python))
        },
        |py, (item, to_python)| to_python(py, item),
        Some(Box::new(move |(item, _)| giver.give_back([item]))),
    )
}
