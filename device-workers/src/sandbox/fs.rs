//! The worker's filesystem view: an empty, read-only tmpfs as its root.

use nix::mount::{mount, umount2, MntFlags, MsFlags};

use super::error::SandboxError;

/// Where the new root's tmpfs is mounted before pivot_root (only inside the worker's own
/// mount namespace; the host never sees it).
const STAGING_DIR: &str = "/tmp";

pub fn pivot_to_empty_root() -> Result<(), SandboxError> {
    let step = |step| move |source| SandboxError::Root { step, source };
    // Nothing we do below may propagate to the host's mounts.
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(step("make / private"))?;
    mount(
        Some("tmpfs"),
        STAGING_DIR,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        Some("size=4k,nr_inodes=2,mode=0555"),
    )
    .map_err(step("mount an empty tmpfs"))?;
    nix::unistd::chdir(STAGING_DIR).map_err(step("chdir to the new root"))?;
    // pivot_root(".", "."): the old root ends up stacked on the new one, then detached,
    // which needs no directory for it inside the (empty) new root.
    match nix::unistd::pivot_root(".", ".") {
        Ok(()) => umount2(".", MntFlags::MNT_DETACH).map_err(step("detach the old root"))?,
        // The host's root is the initramfs (rootfs), which can never be pivoted away
        // from: move the new root over it and chroot there, as switch_root does. This
        // runs before the fork, so the reaper is chrooted too. The old root stays
        // mounted beneath, out of reach: both processes drop CAP_SYS_CHROOT and every
        // other capability next and hold no descriptor of the old tree (the cwd is the
        // new root; the rest are closed), and the worker's filter traps chroot, mount and
        // every open.
        Err(nix::Error::EINVAL) => {
            tracing::info!(
                "pivot_root is refused here (the host's root is an initramfs): \
                 moving the empty root over it and chrooting there"
            );
            mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)
                .map_err(step("move the new root over the initramfs"))?;
            nix::unistd::chroot(".").map_err(step("chroot into the new root"))?;
        }
        Err(e) => return Err(step("pivot_root")(e)),
    }
    nix::unistd::chdir("/").map_err(step("chdir to /"))?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REMOUNT
            | MsFlags::MS_BIND
            | MsFlags::MS_RDONLY
            | MsFlags::MS_NOSUID
            | MsFlags::MS_NODEV
            | MsFlags::MS_NOEXEC,
        None::<&str>,
    )
    .map_err(step("remount the root read-only"))
}
