//! Seccomp policies as reviewed data, audit tooling and syscall decoding. Filled in by the
//! worker issue.
