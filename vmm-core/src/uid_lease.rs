//! Which unprivileged host uid a VM's workers run as. Workers of different VMs with one
//! uid could signal each other, and read each other's /proc; with `--worker-uids A-B`
//! each VM leases its own uid from the range, held by a lock file for the VM's life
//! (`/run/bulkhead/worker-uid-N.lock`, flock: released however bulkhead ends). Without a
//! range every worker runs as 65534 (nobody), as before.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// The uid workers run as without a range.
pub const DEFAULT_UID: u32 = 65534;
/// Where the leases' lock files live.
pub const LEASE_DIR: &str = "/run/bulkhead";

/// Errors of a uid range or lease.
#[derive(Debug, thiserror::Error)]
pub enum UidError {
    #[error(
        "--worker-uids {0:?} must be FIRST-LAST, unprivileged uids (1..=4294967294), FIRST <= LAST"
    )]
    Range(String),
    #[error("no free worker uid in {first}-{last}: each is leased by a running VM")]
    NoneFree { first: u32, last: u32 },
    #[error(
        "--worker-uids: uid {uid} is the {what} {name:?}: workers need uids (and gids) no \
         account or group uses, or that account could signal or trace them"
    )]
    InUse {
        uid: u32,
        what: &'static str,
        name: String,
    },
    #[error("cannot use {path}")]
    Lock {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Host uids for workers, `FIRST-LAST` (inclusive).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct UidRange {
    pub first: u32,
    pub last: u32,
}

impl std::str::FromStr for UidRange {
    type Err = UidError;

    fn from_str(s: &str) -> Result<Self, UidError> {
        let bad = || UidError::Range(s.to_string());
        let (a, b) = s.split_once('-').ok_or_else(bad)?;
        let (first, last): (u32, u32) =
            (a.parse().map_err(|_| bad())?, b.parse().map_err(|_| bad())?);
        if first == 0 || first > last || last == u32::MAX {
            return Err(bad());
        }
        Ok(UidRange { first, last })
    }
}

impl TryFrom<String> for UidRange {
    type Error = UidError;
    fn try_from(s: String) -> Result<Self, UidError> {
        s.parse()
    }
}

impl From<UidRange> for String {
    fn from(r: UidRange) -> String {
        format!("{}-{}", r.first, r.last)
    }
}

/// A uid leased for this VM's workers; released when dropped.
#[derive(Debug)]
pub struct UidLease {
    pub uid: u32,
    _lock: Option<nix::fcntl::Flock<File>>,
}

impl UidLease {
    /// The shared default, 65534, leased by nobody.
    pub fn nobody() -> Self {
        UidLease {
            uid: DEFAULT_UID,
            _lock: None,
        }
    }

    /// The first uid of `range` no running VM holds, its lock file in `dir`.
    pub fn take(range: UidRange, dir: &Path) -> Result<Self, UidError> {
        let lock_err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| UidError::Lock { path, source }
        };
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(lock_err(dir))?;
        for uid in range.first..=range.last {
            refuse_if_in_use(uid)?;
            let path = dir.join(format!("worker-uid-{uid}.lock"));
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o600)
                .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
                .open(&path)
                .map_err(lock_err(&path))?;
            match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
                Ok(locked) => {
                    return Ok(UidLease {
                        uid,
                        _lock: Some(locked),
                    })
                }
                Err((_, nix::Error::EWOULDBLOCK)) => continue,
                Err((_, e)) => return Err(lock_err(&path)(e.into())),
            }
        }
        Err(UidError::NoneFree {
            first: range.first,
            last: range.last,
        })
    }
}

/// A uid an account has (or a gid a group has: workers run with gid = uid) is not for
/// workers: that account's processes could signal or ptrace them, or they its files.
fn refuse_if_in_use(uid: u32) -> Result<(), UidError> {
    use nix::unistd::{Gid, Group, Uid, User};
    if let Ok(Some(user)) = User::from_uid(Uid::from_raw(uid)) {
        return Err(UidError::InUse {
            uid,
            what: "account",
            name: user.name,
        });
    }
    if let Ok(Some(group)) = Group::from_gid(Gid::from_raw(uid)) {
        return Err(UidError::InUse {
            uid,
            what: "gid of the group",
            name: group.name,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_are_checked() {
        assert_eq!(
            "100000-100009".parse::<UidRange>().unwrap(),
            UidRange {
                first: 100_000,
                last: 100_009
            }
        );
        for bad in ["0-5", "5-4", "x-5", "5", "1-4294967295", ""] {
            assert!(bad.parse::<UidRange>().is_err(), "{bad}");
        }
    }

    /// A careless range (here uid 1, Debian's `daemon`) is refused, naming the account.
    #[test]
    fn uids_with_an_account_are_refused() {
        let dir = std::env::temp_dir().join(format!("bulkhead-uids-acct-{}", std::process::id()));
        let err = UidLease::take("1-1".parse().unwrap(), &dir).unwrap_err();
        assert!(
            err.to_string().contains("uid 1 is the account \"daemon\""),
            "{err}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn leases_are_unique_while_held() {
        let dir = std::env::temp_dir().join(format!("bulkhead-uids-{}", std::process::id()));
        let range: UidRange = "300000-300001".parse().unwrap();
        let a = UidLease::take(range, &dir).unwrap();
        let b = UidLease::take(range, &dir).unwrap();
        assert_eq!((a.uid, b.uid), (300_000, 300_001));
        let err = UidLease::take(range, &dir).unwrap_err();
        assert!(
            err.to_string()
                .contains("no free worker uid in 300000-300001"),
            "{err}"
        );
        drop(a);
        assert_eq!(UidLease::take(range, &dir).unwrap().uid, 300_000);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
