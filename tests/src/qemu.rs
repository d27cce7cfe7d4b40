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
    .arg(format!("socket,id=c0,path={}", socket.display()))
    .args([
        "-device",
        &format!("vhost-user-blk-pci,chardev=c0,num-queues={num_queues}"),
    ])
    .arg("-append")
    .arg(format!(
        "console=ttyS0 panic=-1 guestkit.run=\"{guest_cmd}\""
    ));
    cmd
}
