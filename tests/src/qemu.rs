//! The Linux guest kit under QEMU TCG, with a vhost-user-blk disk served by a worker.

use std::path::Path;
use std::process::Command;

use crate::{guest_dir, require_file, require_tool};

/// The script that builds the guest kit.
pub const KIT: &str = "tests/guest/guestkit.sh";
/// Name QEMU gives the guest RAM memfd (memory-backend-memfd id "mem").
pub const GUEST_RAM_MEMFD: &str = "mem";

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
