//! npm packages a test needs, installed by the test itself: `npm ci` in the package's
//! directory, once, under a lock that the test threads and test binaries running at the same
//! time share (a directory created atomically next to `package.json`), so `cargo test` on a
//! machine with node and npm runs the node-backed suites without a separate install step.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

/// Longest `npm ci` may take, and how long a waiter waits for another process's install.
const INSTALL_DEADLINE: Duration = Duration::from_secs(300);

fn installed(dir: &Path, packages: &[&str]) -> bool {
    let modules = dir.join("node_modules");
    packages
        .iter()
        .all(|package| modules.join(package).join("package.json").is_file())
}

/// Removes the lock directory when the install ends, however it ends.
struct Lock<'a>(&'a Path);

impl Drop for Lock<'_> {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(self.0);
    }
}

/// Makes sure `packages` are in `dir/node_modules`, running `npm ci` there if they are not.
/// `Err` says why they are still missing (no npm, or the install failed).
pub fn ensure_installed(dir: &Path, packages: &[&str]) -> Result<(), String> {
    if installed(dir, packages) {
        return Ok(());
    }
    let npm = Command::new("npm")
        .arg("--version")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success());
    if !npm {
        return Err("`npm` is not on PATH to install them".to_owned());
    }
    let lock_path = dir.join(".npm-install.lock");
    let deadline = Instant::now() + INSTALL_DEADLINE;
    loop {
        match std::fs::create_dir(&lock_path) {
            Ok(()) => break,
            Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => {
                // Someone else installs: wait for them, then use what they installed.
                let stale = std::fs::metadata(&lock_path)
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|at| SystemTime::now().duration_since(at).ok())
                    .is_some_and(|age| age > INSTALL_DEADLINE);
                if stale {
                    let _ = std::fs::remove_dir(&lock_path);
                    continue;
                }
                if Instant::now() > deadline {
                    return Err(format!("{} is held too long", lock_path.display()));
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(error) => return Err(format!("cannot lock {}: {error}", lock_path.display())),
        }
    }
    let _lock = Lock(&lock_path);
    // The previous holder may have installed them while we waited.
    if installed(dir, packages) {
        return Ok(());
    }
    let output = Command::new("npm")
        .args(["ci", "--no-audit", "--no-fund", "--prefix"])
        .arg(dir)
        .stdin(Stdio::null())
        .output()
        .map_err(|error| format!("cannot run npm ci: {error}"))?;
    if !output.status.success() {
        return Err(format!(
            "npm ci --prefix {} failed: {}",
            dir.display(),
            String::from_utf8_lossy(&output.stderr).trim()
        ));
    }
    if installed(dir, packages) {
        Ok(())
    } else {
        Err(format!(
            "npm ci in {} did not install {packages:?}",
            dir.display()
        ))
    }
}
