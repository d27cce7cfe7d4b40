//! The Debian package (scripts/build-deb.sh), installed with dpkg into a scratch root, and
//! the man pages and completions bulkhead prints for it.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use tests::{run_bulkhead, run_with_deadline, scratch_dir, workspace_root};

fn ok(mut cmd: Command, what: &str) -> tests::RunResult {
    cmd.stdin(std::process::Stdio::null());
    let r = run_with_deadline(cmd, Duration::from_secs(300));
    assert_eq!(r.code, Some(0), "{what}: {}", r.transcript());
    r
}

/// The package built from this build's binaries installs with dpkg into an empty root:
/// both binaries (stripped), bulkhead's man pages, completions for three shells, the
/// example systemd unit and VM file; the installed bulkhead runs (`--version`, `policy
/// list`) and finds its worker beside it.
#[test]
fn the_deb_installs_and_its_bulkhead_runs() {
    let dir = scratch_dir("packaging-deb");
    let bin_dir = tests::bulkhead_bin().parent().unwrap().to_path_buf();
    // Under a loose umask, which the package's modes must not follow.
    let mut build = Command::new("bash");
    build
        .arg("-c")
        .arg("umask 002; exec \"$0\" \"$@\"")
        .arg(workspace_root().join("scripts/build-deb.sh"))
        .arg("--bin-dir")
        .arg(&bin_dir)
        .arg("--out")
        .arg(dir.join("out"));
    let built = ok(build, "scripts/build-deb.sh");
    let deb = built.stdout.lines().last().unwrap_or("").to_string();
    assert!(
        deb.ends_with(".deb") && Path::new(&deb).is_file(),
        "{}",
        built.transcript()
    );

    let mut info = Command::new("dpkg-deb");
    info.args([
        "--field",
        &deb,
        "Package",
        "Version",
        "Architecture",
        "Depends",
    ]);
    let fields = ok(info, "dpkg-deb --field").stdout;
    assert!(fields.contains("Package: bulkhead"), "{fields}");
    assert!(
        fields.contains("libc6") && fields.contains("libgcc-s1"),
        "{fields}"
    );
    // root:root, nothing group- or world-writable, binaries 0755, the rest 0644.
    let mut contents = Command::new("dpkg-deb");
    contents.args(["--contents", &deb]);
    let listing = ok(contents, "dpkg-deb --contents").stdout;
    for entry in listing.lines() {
        let mut words = entry.split_whitespace();
        let (mode, owner, path) = (
            words.next().unwrap_or(""),
            words.next().unwrap_or(""),
            words.last().unwrap_or(""),
        );
        assert_eq!(owner, "root/root", "{entry}");
        let want = if mode.starts_with('d') || path.starts_with("./usr/bin/") {
            &mode[1..] == "rwxr-xr-x"
        } else {
            &mode[1..] == "rw-r--r--"
        };
        assert!(want, "{entry}");
    }

    // An empty root with an empty dpkg database; libc6 is not "installed" there.
    let root = dir.join("root");
    for d in ["var/lib/dpkg/info", "var/lib/dpkg/updates"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::write(root.join("var/lib/dpkg/status"), "").unwrap();
    let mut install = Command::new("dpkg");
    install.arg(format!("--root={}", root.display())).args([
        "--force-depends",
        "--force-script-chrootless",
        "-i",
        &deb,
    ]);
    ok(install, "dpkg -i");

    for file in [
        "usr/bin/bulkhead",
        "usr/bin/bulkhead-worker",
        "usr/share/man/man1/bulkhead.1.gz",
        "usr/share/man/man1/bulkhead-run.1.gz",
        "usr/share/man/man1/bulkhead-policy.1.gz",
        "usr/share/man/man1/bulkhead-ctl.1.gz",
        "usr/share/bash-completion/completions/bulkhead",
        "usr/share/zsh/vendor-completions/_bulkhead",
        "usr/share/fish/vendor_completions.d/bulkhead.fish",
        "lib/systemd/system/bulkhead@.service",
        "usr/share/doc/bulkhead/examples/vm.json",
        "usr/share/doc/bulkhead/copyright",
    ] {
        assert!(root.join(file).is_file(), "{file} not installed");
    }
    // Stripped: no symbol table left.
    for b in ["bulkhead", "bulkhead-worker"] {
        let mut readelf = Command::new("readelf");
        readelf.arg("-S").arg(root.join("usr/bin").join(b));
        let sections = ok(readelf, "readelf -S").stdout;
        assert!(!sections.contains(".symtab"), "{b} is not stripped");
        assert!(!sections.contains(".debug_info"), "{b} has debug info");
    }

    let installed = root.join("usr/bin/bulkhead");
    let mut version = Command::new(&installed);
    version.arg("--version");
    let v = ok(version, "bulkhead --version").stdout;
    assert!(v.starts_with("bulkhead "), "{v}");
    let mut list = Command::new(&installed);
    list.args(["policy", "list"]);
    let l = ok(list, "bulkhead policy list").stdout;
    assert_eq!(
        l.lines()
            .filter(|r| r.starts_with("blk ") || r.starts_with("vmm "))
            .count(),
        10,
        "{l}"
    );
    // The unit runs what the package installs, from a file of the --config format.
    let unit = std::fs::read_to_string(root.join("lib/systemd/system/bulkhead@.service")).unwrap();
    for line in [
        "ExecStart=/usr/bin/bulkhead run --config /etc/bulkhead/%i.json",
        // A stop (SIGTERM: 128+15) and a --timeout (124) are clean ends.
        "SuccessExitStatus=143 124",
        // The guest's console is not the journal, where bulkhead's log lines are.
        "StandardOutput=append:/var/log/bulkhead/%i.console",
    ] {
        assert!(unit.lines().any(|l| l == line), "{line}: {unit}");
    }
    let mut example = Command::new(&installed);
    example
        .args(["run", "--config"])
        .arg(root.join("usr/share/doc/bulkhead/examples/vm.json"))
        .arg("--print-config");
    ok(example, "the installed example file");
}

/// `bulkhead completions` for each shell (bash's is checked by bash itself) and `bulkhead
/// man` for bulkhead and a command; a hidden command has no page.
#[test]
fn completions_and_man_pages() {
    let dir = scratch_dir("packaging-completions");
    for shell in ["bash", "zsh", "fish", "elvish", "powershell"] {
        let r = run_bulkhead(&["completions", shell], Duration::from_secs(30));
        assert_eq!(r.code, Some(0), "{shell}: {}", r.transcript());
        assert!(r.stdout.contains("bulkhead"), "{shell}");
        if shell == "bash" {
            let file = dir.join("bulkhead.bash");
            std::fs::write(&file, &r.stdout).unwrap();
            let mut check = Command::new("bash");
            check.arg("-n").arg(&file);
            ok(check, "bash -n on the completion script");
            assert!(
                r.stdout.contains("--worker-cgroups"),
                "run's options complete"
            );
        }
    }
    let page = run_bulkhead(&["man"], Duration::from_secs(30));
    assert_eq!(page.code, Some(0), "{}", page.transcript());
    assert!(page.stdout.contains(".TH bulkhead 1"), "{}", page.stdout);
    let run = run_bulkhead(&["man", "run"], Duration::from_secs(30));
    assert!(run.stdout.contains(".TH bulkhead-run 1"), "{}", run.stdout);
    assert!(run.stdout.contains("worker\\-cgroups"), "{}", run.stdout);
    let hidden = run_bulkhead(&["man", "spawner"], Duration::from_secs(30));
    hidden.assert_one_error_line("bulkhead: error: no command \"spawner\"", "page");
}
