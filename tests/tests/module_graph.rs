//! The architecture check: no import cycle among the modules of any crate of the
//! workspace (see `tests::modgraph` for what counts as a dependency). A cycle means the
//! modules in it can only be understood, changed and tested together.

use tests::modgraph;

fn check(crate_root: &str) {
    let root = tests::workspace_root().join(crate_root);
    let graph = modgraph::read_crate(&root)
        .unwrap_or_else(|e| panic!("read the modules of {}: {e}", root.display()));
    assert!(
        graph.files.len() > 1,
        "{} has no modules: the reader is broken",
        root.display()
    );
    let cycles = modgraph::cycles(&graph);
    let text: Vec<String> = cycles
        .iter()
        .map(|c| modgraph::describe(&graph, c))
        .collect();
    assert!(
        cycles.is_empty(),
        "{} has import cycles:\n{}",
        root.display(),
        text.join("\n")
    );
}

#[test]
fn vmm_core_library_has_no_import_cycle() {
    check("vmm-core/src/lib.rs");
}

#[test]
fn bulkhead_binary_has_no_import_cycle() {
    check("vmm-core/src/main.rs");
}

#[test]
fn device_workers_library_has_no_import_cycle() {
    check("device-workers/src/lib.rs");
}

#[test]
fn ipc_has_no_import_cycle() {
    check("ipc/src/lib.rs");
}

#[test]
fn policies_has_no_import_cycle() {
    check("policies/src/lib.rs");
}

#[test]
fn test_support_has_no_import_cycle() {
    check("tests/src/lib.rs");
}
