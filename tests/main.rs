//! Integration tests: one binary, one module per suite. Routers bind 127.0.0.1:0.

mod admin;
mod affinity;
mod auth;
mod bulk;
mod chaos;
mod client_edges;
mod client_stats;
mod clock;
mod cluster;
mod common;
mod control;
mod examples;
mod hostile;
mod jetstream;
mod jobs;
mod log_faults;
mod mtls;
mod power_loss;
mod readme;
mod reconnect;
mod resync;
mod routing;
mod tls;
mod zero_copy;
