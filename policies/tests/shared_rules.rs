//! The rules every VMM thread shares (locks, memory, time, a thread's own start and end) are
//! copied into each VMM policy file, at its end, under one heading: the format has no
//! include, so that each file can be reviewed alone. This keeps the copies the same rules,
//! with the only two differences a reviewer accepted: the frontend and the supervisor map
//! the shared memfds they make, so their `mmap` rule allows a descriptor.

use std::path::Path;

const HEADING: &str = "# --- every VMM thread: locks, memory, time, its own start and end";

/// The rule lines of the shared section, without reasons or flag lines: what the kernel
/// gets from them.
fn shared_rules(file: &str) -> Vec<String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(file);
    let text =
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    let (_, section) = text
        .split_once(HEADING)
        .unwrap_or_else(|| panic!("{file}: no heading {HEADING:?}"));
    section
        .lines()
        .skip(1)
        .filter(|l| !l.trim().is_empty() && !l.starts_with(' ') && !l.starts_with('#'))
        .map(|l| {
            let rule = l.split_once(" : ").map_or(l, |(rule, _reason)| rule);
            rule.split_whitespace().collect::<Vec<_>>().join(" ")
        })
        .collect()
}

#[test]
fn every_vmm_policy_ends_with_the_same_shared_rules() {
    let reference = shared_rules("vmm-vcpu.policy");
    assert!(reference.len() > 20, "{reference:#?}");
    let anonymous_mmap = "mmap arg2 & PROT_EXEC == 0 && arg4:32 == 0xffffffff => allow";
    let memfd_mmap = "mmap arg2 & PROT_EXEC == 0 => allow";
    assert!(
        reference.iter().any(|r| r == anonymous_mmap),
        "{reference:#?}"
    );
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with("vmm") && n.ends_with(".policy"))
        .collect();
    files.sort();
    assert_eq!(files.len(), 9, "{files:?}");
    for file in files {
        let mut rules = shared_rules(&file);
        if file == "vmm-frontend.policy" || file == "vmm-supervisor.policy" {
            let at = rules.iter().position(|r| r == memfd_mmap);
            let at = at.unwrap_or_else(|| panic!("{file}: no {memfd_mmap:?}: {rules:#?}"));
            rules[at] = anonymous_mmap.to_string();
        }
        assert_eq!(
            rules, reference,
            "{file}: its shared rules differ from vmm-vcpu.policy's"
        );
    }
}
