//! The README's code map matches the tree: every source file of a directory the map lists
//! is named in that directory's row, and every file or directory a row names exists.

use std::collections::BTreeSet;
use std::path::Path;

/// The code map's rows: (directory, the names in backticks in its description).
fn rows(readme: &str) -> Vec<(String, BTreeSet<String>)> {
    let section = readme
        .split("\n## Code map\n")
        .nth(1)
        .expect("README.md has a \"## Code map\" section");
    let section = section.split("\n## ").next().unwrap_or(section);
    let mut out = Vec::new();
    for line in section.lines() {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        if cells.len() < 3 {
            continue;
        }
        let Some(dir) = cells[1]
            .strip_prefix('`')
            .and_then(|c| c.strip_suffix('`'))
            .filter(|d| d.ends_with('/'))
        else {
            continue;
        };
        let names = cells[2]
            .split('`')
            .skip(1)
            .step_by(2)
            .map(String::from)
            .collect();
        out.push((dir.to_string(), names));
    }
    out
}

#[test]
fn readme_code_map_names_every_source_file() {
    let root = tests::workspace_root();
    let readme = std::fs::read_to_string(root.join("README.md")).expect("read README.md");
    let rows = rows(&readme);
    assert!(
        rows.len() >= 10,
        "the code map has {} directory rows: the reader is broken",
        rows.len()
    );
    let mut problems = Vec::new();
    for (dir, names) in &rows {
        let path = root.join(dir);
        let Ok(entries) = std::fs::read_dir(&path) else {
            problems.push(format!("{dir}: no such directory"));
            continue;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().to_string();
            if name.ends_with(".rs") && !names.contains(&name) {
                problems.push(format!("{dir}{name} is not in its row"));
            }
        }
        for name in names {
            let plain = name.trim_end_matches('/');
            let looks_like_a_path = plain.ends_with(".rs") || name.ends_with('/');
            if looks_like_a_path && !Path::new(&path).join(plain).exists() {
                problems.push(format!("{dir} names {name}, which does not exist"));
            }
        }
    }
    // Every crate's source directories are in the map.
    for crate_src in [
        "vmm-core/src/",
        "device-workers/src/",
        "ipc/src/",
        "policies/src/",
        "tests/src/",
        "tests/bench/src/",
        "fuzz/fuzz_targets/",
    ] {
        for dir in std::iter::once(root.join(crate_src)).chain(
            std::fs::read_dir(root.join(crate_src))
                .into_iter()
                .flatten()
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.is_dir()),
        ) {
            let rel = format!("{}/", dir.strip_prefix(&root).unwrap().to_string_lossy());
            if !rows.iter().any(|(d, _)| *d == rel) {
                problems.push(format!("{rel} has no row"));
            }
        }
    }
    assert!(
        problems.is_empty(),
        "README.md's code map does not match the tree:\n{}",
        problems.join("\n")
    );
}
