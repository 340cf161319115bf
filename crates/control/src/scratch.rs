//! Scratch directories of this process (device sockets, disks, keys) under the temp dir.

use std::{io, os::unix::fs::DirBuilderExt, path::PathBuf};

/// `$TMPDIR/{name}-{pid}`, empty and private (0700). A directory of that name already there was
/// left by a dead process that had this pid (pids are reused; a killed process leaves its
/// scratch behind), since no live process shares ours: it is removed first, so its stale
/// sockets and files never meet this run.
pub fn fresh_dir(name: &str) -> io::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("{name}-{}", std::process::id()));
    match std::fs::remove_dir_all(&dir) {
        Ok(()) => tracing::debug!(dir = %dir.display(), "removed a dead process's scratch"),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    std::fs::DirBuilder::new().mode(0o700).create(&dir)?;
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stale_directory_of_this_pid_is_replaced_by_an_empty_one() {
        let dir = std::env::temp_dir().join(format!("scratch-test-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("sub")).unwrap();
        std::fs::write(dir.join("nvme.sock"), b"stale").unwrap();
        let fresh = fresh_dir("scratch-test").unwrap();
        assert_eq!(fresh, dir);
        assert_eq!(std::fs::read_dir(&fresh).unwrap().count(), 0);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&fresh).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
        std::fs::remove_dir_all(&fresh).unwrap();
    }
}
