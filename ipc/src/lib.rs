//! Status page, control messages, framing, fd passing and validation shared by the VMM
//! and its workers. Filled in by the worker issue.
