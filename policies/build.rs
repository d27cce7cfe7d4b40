//! Compiles every `*.policy` file of this crate to a BPF program in `$OUT_DIR`.
//!
//! The parser and compiler are the crate's own modules (`#[path]`), so the build and the
//! audit API can never disagree about what a policy means. Any error fails the build with
//! `file:line:column: message`.

#[allow(dead_code)]
#[path = "src/syscalls.rs"]
mod syscalls;

#[allow(dead_code)]
#[path = "src/constants.rs"]
mod constants;

#[allow(dead_code)]
#[path = "src/format.rs"]
mod format;

#[allow(dead_code)]
#[path = "src/compile.rs"]
mod compile;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::{env, fs, process};

fn main() {
    let manifest = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR"));
    for shared in ["syscalls.rs", "constants.rs", "format.rs", "compile.rs"] {
        println!("cargo:rerun-if-changed=src/{shared}");
    }
    // New or removed policy files.
    println!("cargo:rerun-if-changed=.");
    if let Err(message) = build_all(&manifest, &out) {
        eprintln!("error: {message}");
        process::exit(1);
    }
}

fn build_all(manifest: &Path, out: &Path) -> Result<(), String> {
    let mut files: Vec<PathBuf> = fs::read_dir(manifest)
        .map_err(|e| format!("{}: {e}", manifest.display()))?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|ext| ext == "policy"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(format!("no *.policy files in {}", manifest.display()));
    }
    let mut seen: BTreeMap<(String, String), PathBuf> = BTreeMap::new();
    for path in files {
        println!("cargo:rerun-if-changed={}", path.display());
        let label = path.display().to_string();
        let text = fs::read_to_string(&path).map_err(|e| format!("{label}: {e}"))?;
        let (policy, program) =
            compile::parse_and_compile(&label, &text).map_err(|e| e.to_string())?;

        // Naming convention, so that lib.rs can `include_str!` the right file:
        // `<process>.policy` for the main thread, `<process>-<thread>.policy` otherwise.
        let expected = if policy.thread == "main" {
            format!("{}.policy", policy.process)
        } else {
            format!("{}-{}.policy", policy.process, policy.thread)
        };
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        if name != expected {
            return Err(format!(
                "{label}:1: process `{}` thread `{}` must live in `{expected}`",
                policy.process, policy.thread
            ));
        }
        let key = (policy.process.clone(), policy.thread.clone());
        if let Some(other) = seen.insert(key, path.clone()) {
            return Err(format!(
                "{label}:1: process `{}` thread `{}` is already defined by {}",
                policy.process,
                policy.thread,
                other.display()
            ));
        }
        let target = out.join(format!("{}_{}.bpf", policy.process, policy.thread));
        fs::write(&target, compile::to_bytes(&program))
            .map_err(|e| format!("{}: {e}", target.display()))?;
    }
    Ok(())
}
