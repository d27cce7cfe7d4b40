//! ACPI tables (filled by a helper).
