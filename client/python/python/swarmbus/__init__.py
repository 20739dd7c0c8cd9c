"""swarmbus for Python agents: the Rust client as an asyncio package.

Connect with ``await swarmbus.connect(router, ca=..., agent_id=..., swarms=[...])``; the
``Client`` it returns subscribes, publishes (ordered classes return their op id once
durable), acknowledges and receives. Every coroutine runs on one tokio runtime inside the
package; awaiting one parks the asyncio task until the runtime answers (no polling).

``await swarmbus.connect_resilient(...)`` returns a ``ResilientClient`` that reconnects by
itself (backoff with jitter), subscribes again and resumes after the last op it handed
over, so its deliveries go on across a router restart.

Deliveries expose their payload as a read-only buffer over the bytes the client received:
``memoryview(delivery.payload)`` reads them in place, ``bytes(delivery.payload)`` copies.
``IdempotentApply`` drops redeliveries (each ordered op applied once) and keeps its state
in a file across restarts; pass it as ``resume=`` to continue where the agent stood.

Controllers hold fenced leases (``acquire_lease``, ``renew_lease``, ``release_lease``:
``LeaseGrant.token`` stamps their commands, ``FencingFilter`` drops a deposed holder's),
see ``presence``, set configuration (agents read it with ``ConfigView``), pause and resume
swarms, stop agents and drain nodes, and list and re-drive dead letters. Submitters ``submit_job`` and read
``job_updates()`` (dedup with ``JobDedup``, then ``ack_job``); workers
``set_job_credits``, read ``job_events()`` (``JobLease``, ``JobCancel``), heartbeat with
``job_progress`` and report with ``finish_job``; ``register_worker`` advertises the node
(its GPUs from ``detect_gpus()``, through NVML when the driver is there) to placement.
Agents pin a session to a worker node (``open_session``) and send it requests
(``request_worker``); workers answer what ``requests()`` brings with ``reply``.

Errors raise ``SwarmbusError`` with ``code`` (the router's stable error code, or None),
``retry_after_ms`` and ``is_transient``.

Classes are named as the router names them: ``"control"``, ``"command"``, ``"alert"``,
``"reconciliation"``, ``"telemetry"``; roles ``"agent"``, ``"controller"``, ``"worker"``.
"""

import atexit

from . import _native
from ._native import (
    Client,
    ConfigView,
    DeadLetter,
    Delivery,
    DeliveryStream,
    FencingFilter,
    Gpu,
    GpuReport,
    IdempotentApply,
    JobCancel,
    JobDedup,
    JobLease,
    JobStatus,
    JobStream,
    JobUpdate,
    LeaseGrant,
    Payload,
    PresenceMember,
    RequestStream,
    ResilientClient,
    SessionPinned,
    SwarmbusError,
    WorkerReply,
    WorkerRequest,
    connect,
    connect_resilient,
    detect_gpus,
)

__all__ = [
    "Client",
    "ConfigView",
    "DeadLetter",
    "Delivery",
    "DeliveryStream",
    "FencingFilter",
    "Gpu",
    "GpuReport",
    "IdempotentApply",
    "JobCancel",
    "JobDedup",
    "JobLease",
    "JobStatus",
    "JobStream",
    "JobUpdate",
    "LeaseGrant",
    "Payload",
    "PresenceMember",
    "RequestStream",
    "ResilientClient",
    "SessionPinned",
    "SwarmbusError",
    "WorkerReply",
    "WorkerRequest",
    "connect",
    "connect_resilient",
    "detect_gpus",
]

# Before the interpreter finalizes, let the runtime's threads leave Python (see the native
# module's bridge): a task handing over a result must not meet a finalizing interpreter.
atexit.register(_native._quiesce, 1.0)
