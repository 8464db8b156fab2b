//! A real browser for tests: headless Chromium driven over WebDriver (chromedriver, through
//! the fantoccini client). Pages under test talk to the gateway with the browser's own HTTP and
//! WebSocket stacks, an implementation independent of wsgate's.
//!
//! ```ignore
//! let Some(browser) = support::browser::Browser::start().await else { return };
//! browser.goto(&format!("http://{admin}/dashboard")).await;
//! browser.wait_until("window.snapshotCount > 0", Duration::from_secs(20)).await;
//! browser.screenshot(&support::browser::artifact("dashboard.png")).await;
//! browser.close().await;
//! ```
//!
//! Without chromium and chromedriver, [`Browser::start`] prints a loud `SKIPPED` line and
//! returns `None`, so a developer machine without a browser still runs the rest of the suite;
//! with `CI=true` it panics instead, so CI can never skip a browser test silently
//! (`.ci/run` installs both).
//!
//! Every browser gets a fresh profile directory and its own chromedriver on a free loopback
//! port; dropping the [`Browser`] kills chromedriver and the browser it started (they run in
//! their own process group) and removes the profile.
#![allow(dead_code)] // each test binary uses a different part

use fantoccini::wd::Capabilities;
use fantoccini::{Client, ClientBuilder};
use serde_json::{Value, json};
use std::io::Write;
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

/// Flags for Chromium as root in a container without a display or network beyond loopback:
/// no sandbox (root), no GPU, and none of the background traffic (updates, sync, QUIC probes)
/// that would wait on a network that is not there.
const CHROMIUM_ARGS: &[&str] = &[
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1280,900",
];

/// How long chromedriver may take to listen, and Chromium to start a session (cold start on a
/// loaded 2-core machine takes a few seconds).
const START_TIMEOUT: Duration = Duration::from_secs(60);

pub struct Browser {
    client: Client,
    driver: Child,
    profile: PathBuf,
}

/// Where a test keeps files for people to look at after the run (screenshots):
/// `target/test-artifacts/NAME`, the directory created.
pub fn artifact(name: &str) -> PathBuf {
    // CARGO_TARGET_TMPDIR is `<target>/tmp` for integration tests, wherever the target is.
    let target = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .expect("the tmp dir sits in the target dir");
    let dir = target.join("test-artifacts");
    std::fs::create_dir_all(&dir).expect("create target/test-artifacts");
    dir.join(name)
}

fn find(program: &str, env_override: &str) -> Option<PathBuf> {
    if let Some(path) = std::env::var_os(env_override) {
        let path = PathBuf::from(path);
        return path.is_file().then_some(path);
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|candidate| candidate.is_file())
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free loopback port")
        .port()
}

impl Browser {
    /// Starts chromedriver and a headless Chromium session. `None` (after a `SKIPPED` line on
    /// stderr) when either program is missing and `CI` is not `true`.
    ///
    /// # Panics
    /// When a program is missing under `CI=true`, or when they are present but do not start.
    pub async fn start() -> Option<Browser> {
        let chromium =
            find("chromium", "CHROMIUM").or_else(|| find("chromium-browser", "CHROMIUM"));
        let driver = find("chromedriver", "CHROMEDRIVER");
        let (Some(chromium), Some(driver)) = (chromium, driver) else {
            let message = "chromium/chromedriver not found (apt-get install chromium chromium-driver, or set CHROMIUM and CHROMEDRIVER)";
            if std::env::var("CI").as_deref() == Ok("true") {
                panic!("{message}: browser tests must not be skipped in CI");
            }
            // Straight to the process's stderr: the test harness captures `eprintln!` of a
            // passing test, and a skip must be seen.
            let _ = writeln!(std::io::stderr(), "\n*** SKIPPED: {message} ***\n");
            return None;
        };
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let profile = std::env::temp_dir().join(format!(
            "wsgate-chromium-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&profile);
        std::fs::create_dir_all(&profile).expect("create the browser profile directory");

        let port = free_port();
        let driver = Command::new(&driver)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            // Its own process group, so that dropping the Browser can end chromedriver and
            // every browser process it started with one signal.
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", driver.display()));
        let mut browser_args: Vec<String> = CHROMIUM_ARGS.iter().map(|a| a.to_string()).collect();
        browser_args.push(format!("--user-data-dir={}", profile.display()));
        let mut capabilities = Capabilities::new();
        capabilities.insert("browserName".into(), json!("chrome"));
        capabilities.insert(
            "goog:chromeOptions".into(),
            json!({ "binary": chromium, "args": browser_args }),
        );
        let url = format!("http://127.0.0.1:{port}");
        let deadline = tokio::time::Instant::now() + START_TIMEOUT;
        // chromedriver takes a moment to listen; until then connecting fails.
        let client = loop {
            let connector = hyper_util::client::legacy::connect::HttpConnector::new();
            match ClientBuilder::new(connector)
                .capabilities(capabilities.clone())
                .connect(&url)
                .await
            {
                Ok(client) => break client,
                Err(error) if tokio::time::Instant::now() >= deadline => {
                    let mut driver = driver;
                    kill_group(&mut driver);
                    let _ = std::fs::remove_dir_all(&profile);
                    panic!(
                        "no WebDriver session from chromedriver on {url} within {START_TIMEOUT:?}: {error}"
                    );
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        };
        Some(Browser {
            client,
            driver,
            profile,
        })
    }

    /// Navigates and waits for the page's load event.
    pub async fn goto(&self, url: &str) {
        self.client
            .goto(url)
            .await
            .unwrap_or_else(|e| panic!("open {url}: {e}"));
    }

    /// Evaluates a JavaScript expression in the page and returns its value as JSON.
    pub async fn eval(&self, expression: &str) -> Value {
        self.client
            .execute(&format!("return ({expression});"), Vec::new())
            .await
            .unwrap_or_else(|e| panic!("evaluate {expression}: {e}"))
    }

    /// Polls `predicate` (a JavaScript expression) until it is truthy.
    ///
    /// # Panics
    /// After `timeout`, naming the predicate and what `document.body.innerText` showed.
    pub async fn wait_until(&self, predicate: &str, timeout: Duration) {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let value = self.eval(&format!("!!({predicate})")).await;
            if value == Value::Bool(true) {
                return;
            }
            if tokio::time::Instant::now() >= deadline {
                let text = self
                    .eval("document.body ? document.body.innerText : ''")
                    .await;
                panic!(
                    "timed out after {timeout:?} waiting for `{predicate}`; the page shows:\n{}",
                    text.as_str().unwrap_or_default()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Saves a PNG of the viewport to `path`, creating its directory.
    pub async fn screenshot(&self, path: &Path) {
        let png = self
            .client
            .screenshot()
            .await
            .unwrap_or_else(|e| panic!("screenshot: {e}"));
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).expect("create the screenshot directory");
        }
        std::fs::write(path, png).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    }

    /// The fantoccini client, for anything this wrapper does not cover.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Ends the WebDriver session (Chromium exits), then chromedriver.
    pub async fn close(self) {
        let _ = self.client.clone().close().await;
        // Drop kills chromedriver and removes the profile.
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        kill_group(&mut self.driver);
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}

/// Ends chromedriver and every browser process it started: its group, which it leads.
fn kill_group(driver: &mut Child) {
    let _ = Command::new("kill")
        .args(["-KILL", "--", &format!("-{}", driver.id())])
        .stderr(Stdio::null())
        .status();
    let _ = driver.wait();
}
