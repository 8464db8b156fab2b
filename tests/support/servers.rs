//! Real Redis, PostgreSQL and DNS (dnsmasq) servers for tests, each on a free loopback port in a temporary
//! directory of its own, stopped when dropped.
//!
//! A missing program makes [`Redis::start`] or [`Postgres::start`] return `None` after a
//! `SKIPPED` line on stderr, so `cargo test` passes on a machine without them; with `CI=true`
//! they panic instead, so CI never skips silently. PostgreSQL refuses to run as root: when the
//! tests run as root, it runs as the `postgres` user (`WSGATE_PG_USER` overrides the name).

use std::io::Write;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// Longest a server may take to accept connections after it was started.
const READY: Duration = Duration::from_secs(30);

/// Where `name` is: `$ENV_VAR`, the `PATH`, then the `extra` directories (glob-free).
fn find(name: &str, env_var: &str, extra: &[PathBuf]) -> Option<PathBuf> {
    if let Some(path) = std::env::var_os(env_var) {
        return Some(PathBuf::from(path));
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(extra.iter().cloned())
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

/// Debian's PostgreSQL keeps its programs under /usr/lib/postgresql/<major>/bin, off the PATH.
fn postgres_dirs() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .map(|entry| entry.path().join("bin"))
                .collect()
        })
        .unwrap_or_default();
    dirs.sort();
    dirs.reverse();
    dirs
}

/// A loud skip, or a panic under `CI=true`.
pub fn missing(what: &str, hint: &str) {
    let message = format!("{what} not found ({hint})");
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{message}: tests with real servers must not be skipped in CI");
    }
    // Straight to the process's stderr: the harness hides a passing test's eprintln!.
    let _ = writeln!(std::io::stderr(), "\n*** SKIPPED: {message} ***\n");
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free loopback port")
        .port()
}

fn temp_dir(kind: &str) -> PathBuf {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!(
        "wsgate-{kind}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create a temporary directory");
    dir
}

/// Waits until `check` holds, polling; panics with `what` after [`READY`].
pub fn wait_until(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + READY;
    while !check() {
        assert!(Instant::now() < deadline, "{what} within {READY:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Sends SIGTERM or SIGINT through kill(1): the std library only sends SIGKILL, which would
/// not let PostgreSQL shut down cleanly.
fn signal(child: &Child, name: &str) {
    let _ = Command::new("kill")
        .args([format!("-{name}"), child.id().to_string()])
        .status();
}

/// Waits for `child` to exit, killing it after `grace`.
fn reap(child: &mut Child, grace: Duration) {
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// A redis-server on 127.0.0.1, without persistence.
pub struct Redis {
    program: PathBuf,
    dir: PathBuf,
    pub port: u16,
    child: Option<Child>,
}

impl Redis {
    pub fn start() -> Option<Redis> {
        let Some(program) = find("redis-server", "REDIS_SERVER", &[]) else {
            missing(
                "redis-server",
                "apt-get install redis-server, or set REDIS_SERVER",
            );
            return None;
        };
        let mut redis = Redis {
            program,
            dir: temp_dir("redis"),
            port: free_port(),
            child: None,
        };
        redis.resume();
        Some(redis)
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn ping(&self) -> bool {
        use std::io::Read;
        let Ok(mut stream) = TcpStream::connect(("127.0.0.1", self.port)) else {
            return false;
        };
        let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
        let mut reply = [0; 7];
        stream.write_all(b"PING\r\n").is_ok()
            && stream.read_exact(&mut reply).is_ok()
            && &reply == b"+PONG\r\n"
    }

    /// Starts the server (again) on the same port.
    pub fn resume(&mut self) {
        assert!(self.child.is_none(), "redis is running");
        let child = Command::new(&self.program)
            .args(["--bind", "127.0.0.1", "--port", &self.port.to_string()])
            .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"])
            .arg("--dir")
            .arg(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", self.program.display()));
        self.child = Some(child);
        wait_until("redis-server answers PING", || self.ping());
    }

    /// Freezes the server (SIGSTOP): connections stay open and nothing is answered, as when
    /// a host hangs or a route drops packets silently. [`Redis::thaw`] lets it go on.
    pub fn freeze(&mut self) {
        self.signal("-STOP");
    }

    pub fn thaw(&mut self) {
        self.signal("-CONT");
    }

    fn signal(&self, signal: &str) {
        let child = self.child.as_ref().expect("redis is running");
        let status = Command::new("kill")
            .args([signal, &child.id().to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill {signal}");
    }

    /// Stops the server; every client connection breaks.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A PostgreSQL cluster of its own on 127.0.0.1 (trust authentication, no fsync), user
/// `wsgate`, database `postgres`.
pub struct Postgres {
    bin: PathBuf,
    dir: PathBuf,
    pub port: u16,
    /// uid and gid to run as, when the tests run as root.
    user: Option<(u32, u32)>,
    child: Option<Child>,
}

/// The uid and gid of `name` in /etc/passwd.
fn passwd_ids(name: &str) -> Option<(u32, u32)> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        (fields.first() == Some(&name) && fields.len() > 3)
            .then(|| Some((fields[2].parse().ok()?, fields[3].parse().ok()?)))
            .flatten()
    })
}

fn running_as_root() -> bool {
    std::fs::metadata("/proc/self")
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0)
        .unwrap_or(false)
}

impl Postgres {
    pub fn start() -> Option<Postgres> {
        let dirs = postgres_dirs();
        let (Some(initdb), Some(postgres)) = (
            find("initdb", "INITDB", &dirs),
            find("postgres", "POSTGRES", &dirs),
        ) else {
            missing(
                "PostgreSQL (initdb, postgres)",
                "apt-get install postgresql, or set INITDB and POSTGRES",
            );
            return None;
        };
        assert_eq!(
            initdb.parent(),
            postgres.parent(),
            "initdb and postgres from one installation"
        );
        let user = if running_as_root() {
            let name = std::env::var("WSGATE_PG_USER").unwrap_or_else(|_| "postgres".into());
            Some(passwd_ids(&name).unwrap_or_else(|| {
                panic!("running as root, PostgreSQL needs an unprivileged user: no {name:?} in /etc/passwd (set WSGATE_PG_USER)")
            }))
        } else {
            None
        };
        let dir = temp_dir("postgres");
        if let Some((uid, gid)) = user {
            std::os::unix::fs::chown(&dir, Some(uid), Some(gid)).expect("chown the data dir");
        }
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
            .expect("chmod the data dir");
        let mut pg = Postgres {
            bin: postgres.parent().expect("a directory").to_path_buf(),
            dir,
            port: free_port(),
            user,
            child: None,
        };
        let data = pg.data();
        let output = pg
            .command("initdb")
            .arg("-D")
            .arg(&data)
            .args(["-U", "wsgate", "--auth=trust", "-E", "UTF8", "--no-sync"])
            .output()
            .expect("run initdb");
        assert!(
            output.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        pg.resume();
        Some(pg)
    }

    fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    fn command(&self, program: &str) -> Command {
        let mut command = Command::new(self.bin.join(program));
        if let Some((uid, gid)) = self.user {
            command.uid(uid).gid(gid);
        }
        // Its own process group: a Ctrl-C at the terminal must not stop it under a test.
        command.process_group(0);
        command
    }

    pub fn url(&self) -> String {
        format!("postgres://wsgate@127.0.0.1:{}/postgres", self.port)
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// Starts the server (again) on the same port and data.
    pub fn resume(&mut self) {
        assert!(self.child.is_none(), "postgres is running");
        let child = self
            .command("postgres")
            .arg("-D")
            .arg(self.data())
            .args([
                "-p",
                &self.port.to_string(),
                "-c",
                "listen_addresses=127.0.0.1",
            ])
            .arg("-c")
            .arg(format!("unix_socket_directories={}", self.dir.display()))
            .args(["-c", "fsync=off", "-c", "full_page_writes=off"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("start postgres: {e}"));
        self.child = Some(child);
        let marker = self.data().join("postmaster.pid");
        wait_until("postgres accepts connections", || {
            ready(&marker) && TcpStream::connect(self.addr()).is_ok()
        });
    }

    /// Stops the server (fast shutdown: clients are disconnected at once).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            signal(&child, "INT");
            reap(&mut child, Duration::from_secs(20));
        }
    }
}

/// PostgreSQL writes "ready" on the eighth line of postmaster.pid once it accepts connections.
fn ready(pid_file: &Path) -> bool {
    std::fs::read_to_string(pid_file)
        .map(|pid| pid.lines().nth(7).is_some_and(|l| l.trim() == "ready"))
        .unwrap_or(false)
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A dnsmasq answering from a hosts file of its own (no upstream servers, no /etc/hosts) on
/// 127.0.0.1, UDP and TCP.
pub struct Dnsmasq {
    dir: PathBuf,
    pub port: u16,
    child: Option<Child>,
}

impl Dnsmasq {
    /// Starts serving `hosts` (lines of `address name`).
    pub fn start(hosts: &str) -> Option<Dnsmasq> {
        Self::start_with(hosts, &[])
    }

    /// [`start`](Self::start) with more dnsmasq options (`--srv-host=...`, read at start only).
    pub fn start_with(hosts: &str, options: &[String]) -> Option<Dnsmasq> {
        let Some(program) = find("dnsmasq", "DNSMASQ", &[PathBuf::from("/usr/sbin")]) else {
            missing("dnsmasq", "apt-get install dnsmasq-base, or set DNSMASQ");
            return None;
        };
        let dir = temp_dir("dnsmasq");
        let mut dns = Dnsmasq {
            dir,
            port: free_port(),
            child: None,
        };
        dns.set_hosts(hosts);
        let hosts_file = dns.dir.join("hosts");
        let child = Command::new(&program)
            .args(["--no-daemon", "--conf-file=/dev/null", "--pid-file"])
            .arg(format!("--port={}", dns.port))
            .args(["--listen-address=127.0.0.1", "--bind-interfaces"])
            .args(["--no-resolv", "--no-hosts", "--user=root"])
            .arg(format!("--addn-hosts={}", hosts_file.display()))
            .args(options)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", program.display()));
        dns.child = Some(child);
        let port = dns.port;
        wait_until("dnsmasq accepts TCP", || {
            TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        Some(dns)
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// Writes the hosts file; dnsmasq reads it at start and on [`reload`](Self::reload).
    pub fn set_hosts(&self, hosts: &str) {
        let path = self.dir.join("hosts");
        let staged = self.dir.join("hosts.new");
        std::fs::write(&staged, hosts).expect("write the hosts file");
        let _ = std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(0o644));
        std::fs::rename(&staged, &path).expect("replace the hosts file");
    }

    /// SIGHUP: dnsmasq clears its cache and reads the hosts file again.
    pub fn reload(&self) {
        if let Some(child) = &self.child {
            signal(child, "HUP");
        }
    }

    /// Stops the server: every lookup fails from now on.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
