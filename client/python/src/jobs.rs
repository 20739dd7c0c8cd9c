//! Jobs: submitters (submit, ends, acknowledgements, cancels) and workers (credits,
//! leases, progress, results), and the submitter's `JobDedup`.

use std::sync::{Arc, Mutex as StdMutex};

use bytes::Bytes;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use swarmbus_client::{JobEvent, JobEvents, JobUpdates};
use swarmbus_schema::{JobId, SubmitJob};

use crate::delivery::Payload;
use crate::error;
use crate::inbox::{next_item, taken, Inbox};
use crate::session::Client;

/// A session's job streams: each taken from the client once, then shared by the Python
/// iterators made from it.
#[derive(Debug, Default)]
pub struct Streams {
    updates: StdMutex<Option<Arc<Inbox<JobUpdates>>>>,
    events: StdMutex<Option<Arc<Inbox<JobEvents>>>>,
}

/// The router's answer about one job.
#[pyclass(frozen, get_all, module = "swarmbus._native")]
#[derive(Debug)]
pub struct JobStatus {
    pub job_id: u64,
    /// queued, running, completed, failed, cancelled or dead_lettered.
    pub state: &'static str,
    pub attempt: u32,
    /// The idempotency key was known: this is the job it named.
    pub duplicate: bool,
}

impl From<swarmbus_schema::JobStatus> for JobStatus {
    fn from(status: swarmbus_schema::JobStatus) -> Self {
        JobStatus {
            job_id: status.job_id.0,
            state: status.state.name(),
            attempt: status.attempt,
            duplicate: status.duplicate,
        }
    }
}

/// Progress or the end of a job, for its submitter.
#[pyclass(frozen, module = "swarmbus._native")]
#[derive(Debug)]
pub struct JobUpdate {
    update: swarmbus_schema::JobUpdate,
}

#[pymethods]
impl JobUpdate {
    #[getter]
    fn job_id(&self) -> u64 {
        self.update.job_id.0
    }
    #[getter]
    fn swarm(&self) -> &str {
        &self.update.swarm
    }
    #[getter]
    fn idempotency_key(&self) -> &str {
        &self.update.idempotency_key
    }
    /// running (progress) or the end: completed, failed, cancelled, dead_lettered.
    #[getter]
    fn state(&self) -> &'static str {
        self.update.state.name()
    }
    #[getter]
    fn is_final(&self) -> bool {
        self.update.state.is_final()
    }
    #[getter]
    fn attempt(&self) -> u32 {
        self.update.attempt
    }
    #[getter]
    fn reason(&self) -> &str {
        &self.update.reason
    }
    /// The result (an end) or the progress payload, without a copy.
    #[getter]
    fn payload(&self) -> Payload {
        Payload::from(self.update.payload.clone())
    }
    fn __repr__(&self) -> String {
        format!(
            "JobUpdate(job_id={}, state={:?}, attempt={})",
            self.update.job_id.0,
            self.update.state.name(),
            self.update.attempt
        )
    }
}

/// An attempt of a job leased to this worker: heartbeat with `job_progress` within
/// `lease_ms`, then report with `finish_job`.
#[pyclass(frozen, get_all, module = "swarmbus._native")]
#[derive(Debug)]
pub struct JobLease {
    pub job_id: u64,
    pub attempt: u32,
    pub swarm: String,
    pub model: Option<String>,
    pub submitter: String,
    pub priority: u8,
    pub lease_ms: u32,
    pub payload: Payload,
}

/// Stop attempt `attempt` of `job_id`: cancelled, or fenced (its result would be refused).
#[pyclass(frozen, get_all, module = "swarmbus._native")]
#[derive(Debug)]
pub struct JobCancel {
    pub job_id: u64,
    pub attempt: u32,
}

/// A job stream as an asynchronous iterator; it ends with the session.
#[pyclass(frozen, module = "swarmbus._native")]
#[derive(Debug)]
pub struct JobStream {
    stream: Stream,
}

#[derive(Debug)]
enum Stream {
    Updates(Arc<Inbox<JobUpdates>>),
    Events(Arc<Inbox<JobEvents>>),
}

#[pymethods]
impl JobStream {
    fn __aiter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __anext__<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        match &self.stream {
            Stream::Updates(updates) => next_item(py, updates, |py, update| {
                Ok(Py::new(py, JobUpdate { update })?.into_any())
            }),
            Stream::Events(events) => next_item(py, events, event_object),
        }
    }
}

fn event_object(py: Python<'_>, event: JobEvent) -> PyResult<Py<PyAny>> {
    Ok(match event {
        JobEvent::Lease(lease) => Py::new(
            py,
            JobLease {
                job_id: lease.job_id.0,
                attempt: lease.attempt,
                swarm: lease.swarm,
                model: lease.model,
                submitter: lease.submitter,
                priority: lease.priority,
                lease_ms: lease.lease_ms,
                payload: Payload::from(lease.payload),
            },
        )?
        .into_any(),
        JobEvent::Cancel { job_id, attempt } => Py::new(
            py,
            JobCancel {
                job_id: job_id.0,
                attempt,
            },
        )?
        .into_any(),
    })
}

fn no_stream(what: &str) -> PyErr {
    PyValueError::new_err(format!("this session has no {what} (see its role)"))
}

#[pymethods]
impl Client {
    /// Submits a job to `swarm`'s workers; returns its status once the job is durable. A
    /// key submitted before (within the dedup window) returns that job, `duplicate` set.
    #[pyo3(signature = (swarm, idempotency_key, payload, *, model = None, priority = 0, deadline_ms = 0, max_attempts = 0))]
    #[allow(clippy::too_many_arguments)] // Python's keyword arguments, one per option
    fn submit_job<'py>(
        &self,
        py: Python<'py>,
        swarm: String,
        idempotency_key: String,
        payload: &[u8],
        model: Option<String>,
        priority: u8,
        deadline_ms: u64,
        max_attempts: u32,
    ) -> PyResult<Bound<'py, PyAny>> {
        let job = SubmitJob {
            request_id: 0,
            swarm,
            idempotency_key,
            model,
            priority,
            deadline_ms,
            max_attempts,
            payload: Bytes::copy_from_slice(payload),
        };
        let client = self.inner.clone();
        crate::bridge::spawn(py, async move {
            Ok(JobStatus::from(
                client.submit_job(job).await.map_err(error)?,
            ))
        })
    }

    /// `async for update in client.job_updates()`: progress and ends of this agent's jobs
    /// (an end is sent again on every reconnect until acknowledged).
    fn job_updates(&self) -> PyResult<JobStream> {
        let updates = taken(&self.jobs.updates, || self.inner.job_updates())
            .ok_or_else(|| no_stream("job updates"))?;
        Ok(JobStream {
            stream: Stream::Updates(updates),
        })
    }

    /// Tells the router the end `update` was handled (a progress update acknowledges
    /// nothing): it stops resending it and forgets the job.
    fn ack_job<'py>(&self, py: Python<'py>, update: &JobUpdate) -> PyResult<Bound<'py, PyAny>> {
        let (client, update) = (self.inner.clone(), update.update.clone());
        crate::bridge::spawn(
            py,
            async move { client.ack_job(&update).await.map_err(error) },
        )
    }

    /// Cancels a job (its submitter or a controller).
    fn cancel_job<'py>(&self, py: Python<'py>, job_id: u64) -> PyResult<Bound<'py, PyAny>> {
        let client = self.inner.clone();
        crate::bridge::spawn(py, async move {
            Ok(JobStatus::from(
                client.cancel_job(JobId(job_id)).await.map_err(error)?,
            ))
        })
    }

    /// `async for event in client.job_events()` (workers): `JobLease` and `JobCancel`.
    fn job_events(&self) -> PyResult<JobStream> {
        let events = taken(&self.jobs.events, || self.inner.job_events())
            .ok_or_else(|| no_stream("job events"))?;
        Ok(JobStream {
            stream: Stream::Events(events),
        })
    }

    /// How many attempts this worker runs at once; leases come while it has credit.
    fn set_job_credits<'py>(&self, py: Python<'py>, credits: u32) -> PyResult<Bound<'py, PyAny>> {
        let client = self.inner.clone();
        crate::bridge::spawn(py, async move {
            client.set_job_credits(credits).await.map_err(error)
        })
    }

    /// A heartbeat for a running attempt (extends its lease); a non-empty `payload` is
    /// progress for the submitter.
    #[pyo3(signature = (job_id, attempt, payload = b"".as_slice()))]
    fn job_progress<'py>(
        &self,
        py: Python<'py>,
        job_id: u64,
        attempt: u32,
        payload: &[u8],
    ) -> PyResult<Bound<'py, PyAny>> {
        let (client, payload) = (self.inner.clone(), Bytes::copy_from_slice(payload));
        crate::bridge::spawn(py, async move {
            client
                .job_progress(JobId(job_id), attempt, payload)
                .await
                .map_err(error)
        })
    }

    /// Reports attempt `attempt` of `job_id`: `ok` with its result, or failed (`retry`:
    /// run it again elsewhere). A fenced attempt's report is refused (code 30, LeaseFenced).
    #[pyo3(signature = (job_id, attempt, ok, result = b"".as_slice(), *, retry = false))]
    fn finish_job<'py>(
        &self,
        py: Python<'py>,
        job_id: u64,
        attempt: u32,
        ok: bool,
        result: &[u8],
        retry: bool,
    ) -> PyResult<Bound<'py, PyAny>> {
        let (client, result) = (self.inner.clone(), Bytes::copy_from_slice(result));
        crate::bridge::spawn(py, async move {
            let status = client
                .finish_job(JobId(job_id), attempt, ok, retry, result)
                .await
                .map_err(error)?;
            Ok(JobStatus::from(status))
        })
    }
}

/// One entry of a swarm's dead-letter queue.
#[pyclass(frozen, get_all, module = "swarmbus._native")]
#[derive(Debug)]
pub struct DeadLetter {
    pub job_id: u64,
    pub attempts: u32,
    pub idempotency_key: String,
    pub reason: String,
}

#[pymethods]
impl Client {
    /// A page of `swarm`'s dead letters after job `after` (at most `limit`, up to 256), in
    /// job id order, and whether more follow (controllers only).
    #[pyo3(signature = (swarm, after = 0, limit = 256))]
    fn dead_letters<'py>(
        &self,
        py: Python<'py>,
        swarm: String,
        after: u64,
        limit: u32,
    ) -> PyResult<Bound<'py, PyAny>> {
        let client = self.inner.clone();
        crate::bridge::spawn(py, async move {
            let page = client
                .dead_letters(&swarm, JobId(after), limit)
                .await
                .map_err(error)?;
            let jobs: Vec<DeadLetter> = page
                .jobs
                .into_iter()
                .map(|dead| DeadLetter {
                    job_id: dead.job_id.0,
                    attempts: dead.attempts,
                    idempotency_key: dead.idempotency_key,
                    reason: dead.reason,
                })
                .collect();
            Ok((jobs, page.more))
        })
    }

    /// Queues a dead letter again with a fresh attempt budget and no deadline (controllers
    /// only); its submitter then gets the new end.
    fn redrive_job<'py>(
        &self,
        py: Python<'py>,
        swarm: String,
        job_id: u64,
    ) -> PyResult<Bound<'py, PyAny>> {
        let client = self.inner.clone();
        crate::bridge::spawn(py, async move {
            let status = client
                .redrive_job(&swarm, JobId(job_id))
                .await
                .map_err(error)?;
            Ok(JobStatus::from(status))
        })
    }
}

/// The submitter's dedup of job ends: each end handled once, across reconnects.
#[pyclass(frozen, module = "swarmbus._native")]
#[derive(Debug, Default)]
pub struct JobDedup {
    seen: StdMutex<swarmbus_client::JobDedup>,
}

#[pymethods]
impl JobDedup {
    #[new]
    fn new() -> Self {
        JobDedup::default()
    }

    /// Whether `update` is seen for the first time (and records it).
    fn first_time(&self, update: &JobUpdate) -> bool {
        crate::lock(&self.seen).first_time(&update.update)
    }
}
