//! The control API: HTTP/1.1 on a Unix socket (`bulkhead run --api-socket PATH`), JSON
//! answers, served by hyper on one confined thread (`api`) that runs a single-threaded
//! tokio runtime. The routes are in [`routes::ROUTES`] and described for clients in
//! `docs/openapi.json` (a test keeps the two equal); `bulkhead ctl` is the client.
//!
//! Clients are untrusted, even though only the socket's owner may connect: connections,
//! request heads and bodies, the time a request may take and the number of event streams
//! are bounded ([`server`]), and at the descriptor limit the listener waits instead of
//! spinning. Work that blocks (a planned restart, a pause) runs on a thread of its own,
//! so a slow request never holds up another client, and nothing the API does takes a
//! lock a vCPU waits for.

pub mod client;
pub mod context;
pub mod routes;
pub mod server;
pub mod socket;

pub use client::request;
pub use context::{ApiContext, ApiDisk, VmControl};
pub use server::serve;
pub use socket::{bind, ApiError, ApiSocket};
