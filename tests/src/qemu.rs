//! QEMU command lines: the test guest under QEMU microvm with KVM (shared with the
//! `bulkhead-bench` binary), and the Linux guest kit under QEMU TCG with a vhost-user-blk
//! disk served by a worker.

use std::path::Path;
use std::process::Command;

use crate::{guest_dir, require_file, require_tool};

/// The script that builds the guest kit.
pub const KIT: &str = "tests/guest/guestkit.sh";
/// Name QEMU gives the guest RAM memfd (memory-backend-memfd id "mem").
pub const GUEST_RAM_MEMFD: &str = "mem";

/// Guest RAM of [`microvm_args`], in MiB.
pub const MICROVM_MIB: u32 = 64;

/// Appends to `cmd` (QEMU, or a wrapper whose next argument is QEMU) the arguments of a
/// QEMU microvm with KVM booting the test guest `kernel` with `append`: `machine` options
/// (e.g. `microvm,acpi=off`), `cpus` vCPUs (threads named "CPU n/KVM"),
/// [`MICROVM_MIB`] of RAM, the serial port on stdio, modern virtio-mmio and isa-debug-exit
/// (which turns the guest's status v into QEMU's exit status (v << 1) | 1).
pub fn microvm_args<'c>(
    cmd: &'c mut Command,
    machine: &str,
    cpus: u32,
    kernel: &Path,
    append: &str,
) -> &'c mut Command {
    cmd.args(["-M", machine, "-accel", "kvm"])
        .args(["-name", "testguest,debug-threads=on"])
        .args(["-cpu", "host,-arch-capabilities", "-m"])
        .arg(MICROVM_MIB.to_string())
        .arg("-smp")
        .arg(cpus.to_string())
        .args(["-display", "none", "-monitor", "none", "-serial", "stdio"])
        .args(["-no-reboot", "-global", "virtio-mmio.force-legacy=false"])
        .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=4"])
        .arg("-kernel")
        .arg(kernel)
        .args(["-append", append])
}

/// Appends guest RAM for [`microvm_args`] as a shared memfd (what a vhost-user backend
/// needs to map it), in 2 MiB huge pages with `huge`.
pub fn microvm_shared_ram(cmd: &mut Command, huge: bool) -> &mut Command {
    cmd.arg("-object")
        .arg(format!(
            "memory-backend-memfd,id={GUEST_RAM_MEMFD},size={MICROVM_MIB}M,share=on{}",
            if huge {
                ",hugetlb=on,hugetlbsize=2M"
            } else {
                ""
            }
        ))
        .args(["-machine", &format!("memory-backend={GUEST_RAM_MEMFD}")])
}

/// Appends a vhost-user-blk virtio-mmio device whose backend listens on `socket`.
pub fn vhost_user_blk_mmio<'c>(cmd: &'c mut Command, socket: &Path) -> &'c mut Command {
    cmd.arg("-chardev")
        .arg(format!("socket,id=c0,path={}", socket.display()))
        .args(["-device", "vhost-user-blk,chardev=c0"])
}

/// QEMU TCG booting the guest kit with our vhost-user-blk disk and `guest_cmd`.
pub fn qemu_with_vhost_user(socket: &Path, num_queues: u16, guest_cmd: &str) -> Command {
    qemu_with_vhost_user_opts(socket, num_queues, guest_cmd, false)
}

/// As [`qemu_with_vhost_user`]; with `reconnect`, QEMU reconnects to the socket every
/// second after the backend goes away (`-chardev socket,...,reconnect=1`). A command with
/// double quotes travels base64-encoded (`guestkit.run64`).
pub fn qemu_with_vhost_user_opts(
    socket: &Path,
    num_queues: u16,
    guest_cmd: &str,
    reconnect: bool,
) -> Command {
    let qemu = require_tool("qemu-system-x86_64", "qemu-system-x86");
    let dir = guest_dir();
    let vmlinuz = require_file(dir.join("vmlinuz"), KIT);
    let initrd = require_file(dir.join("initramfs.cpio.gz"), KIT);
    let mut cmd = Command::new(qemu);
    cmd.args([
        "-accel", "tcg", "-M", "q35", "-cpu", "max", "-smp", "2", "-m", "512",
    ])
    .args([
        "-object",
        &format!("memory-backend-memfd,id={GUEST_RAM_MEMFD},size=512M,share=on"),
    ])
    .args(["-numa", &format!("node,memdev={GUEST_RAM_MEMFD}")])
    .args(["-display", "none", "-serial", "stdio", "-no-reboot"])
    .arg("-kernel")
    .arg(vmlinuz)
    .arg("-initrd")
    .arg(initrd)
    .arg("-chardev")
    .arg(format!(
        "socket,id=c0,path={}{}",
        socket.display(),
        if reconnect { ",reconnect=1" } else { "" }
    ))
    .args([
        "-device",
        &format!("vhost-user-blk-pci,chardev=c0,num-queues={num_queues}"),
    ])
    .arg("-append")
    .arg(format!(
        "console=ttyS0 panic=-1 {}",
        guestkit_run(guest_cmd)
    ));
    cmd
}

/// The kernel command-line entry that makes the guest kit run `cmd`.
fn guestkit_run(cmd: &str) -> String {
    if !cmd.contains('"') {
        return format!("guestkit.run=\"{cmd}\"");
    }
    let tool = require_tool("base64", "coreutils");
    let mut child = Command::new(tool)
        .arg("-w0")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("run base64");
    std::io::Write::write_all(&mut child.stdin.take().expect("stdin"), cmd.as_bytes())
        .expect("feed base64");
    let out = child.wait_with_output().expect("base64 output");
    format!(
        "guestkit.run64={}",
        String::from_utf8_lossy(&out.stdout).trim()
    )
}
