//! bulkhead as a vhost-user frontend: a backend connection and its setup
//! ([`connection`]), and the thread per device that runs the backend's rings for the
//! driver ([`rings`]). It reports upward (to a [`rings::BackendOwner`]) and never ends a
//! backend itself.

pub mod connection;
pub mod rings;

pub use connection::{setup, with_deadline, Backend, FrontendError, REPLY_TIMEOUT};
pub use rings::{BackendOwner, Frontend, FrontendHandle};
