//! A VM's disks: their configuration ([`config`]), their images ([`image`]) or NBD
//! exports ([`nbd`]), and how each
//! is attached to the VM ([`attach`]: its transport device, its backend, its frontend
//! thread and, for an image, its worker and the worker's supervisor).

pub mod attach;
pub mod config;
pub mod image;
pub mod nbd;
