//! A probe for `tests/tests/vmm_confinement.rs`: turns the VMM's confinement on as
//! `bulkhead run` does, confines its thread as a VMM thread of ROLE (`vcpu`, `main`, ...)
//! and makes CALL (`socket`, `execve`, `ptrace`), which that role's policy forbids. The
//! expected end is death by SIGSYS after the VMM's one-line report; a call that returns
//! prints `survived`. With `--learn` first, confinement is in learn mode (`policy learn`):
//! the call is recorded and made, and the probe prints each recorded call as
//! `learned: POLICY NR ARG0`.

fn main() {
    let mut args: Vec<String> = std::env::args().collect();
    let learn = args.get(1).map(String::as_str) == Some("--learn");
    if learn {
        args.remove(1);
        vmm_core::confine::enable_learning();
    }
    let [_, role, call] = args.as_slice() else {
        eprintln!("usage: vmm-trap-probe [--learn] ROLE CALL");
        std::process::exit(2);
    };
    let Some(role) = policies::VmmThread::ALL
        .into_iter()
        .find(|r| r.name() == role)
    else {
        eprintln!("vmm-trap-probe: no VMM thread role {role:?}");
        std::process::exit(2);
    };
    if let Err(e) = vmm_core::confine::enable() {
        eprintln!("vmm-trap-probe: {e}");
        std::process::exit(2);
    }
    vmm_core::confine::enter(role);
    // SAFETY: each call is made with valid (or null) arguments; none of them is expected
    // to run, and any that does touches nothing this process relies on.
    let r = unsafe {
        match call.as_str() {
            "socket" => libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) as libc::c_long,
            "execve" => libc::execve(c"/bin/true".as_ptr(), std::ptr::null(), std::ptr::null())
                as libc::c_long,
            "ptrace" => libc::ptrace(libc::PTRACE_TRACEME, 0, 0, 0),
            _ => -1,
        }
    };
    println!("survived: {call} returned {r}");
    let (learned, _) = vmm_core::confine::learned();
    for c in learned {
        let policy = c.role.map_or("(none)", |r| r.name());
        println!("learned: vmm/{policy} {} {:#x}", c.nr, c.args[0]);
    }
}
