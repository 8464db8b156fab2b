//! Backend health: active checks (one task per upstream with `health_check`, probing every
//! backend each interval) and passive checks (the connection path reports every backend
//! connect), both feeding the health bits of the upstream's [`UpstreamBalancer`].
//!
//! Invariants:
//! - routing reads health with one atomic load; everything here (probes, timers, logs, the
//!   last-change note) runs off the connection path, or on it only at a transition;
//! - every backend starts healthy, so a gateway serves from its first second; the active
//!   verdict flips only after `unhealthy_threshold` consecutive failed probes, or
//!   `healthy_threshold` consecutive passed ones;
//! - the active and passive verdicts are independent: a backend is chosen only when neither
//!   holds it out, so a passing probe never cuts a passive back-off short (a tcp probe can
//!   pass while real handshakes time out);
//! - a passive back-off is started by one failed connect only (the balancer's bit is set
//!   atomically, and only the setter goes on), and ended by the one timer that setter starts;
//!   so failures of connections already under way neither stack timers nor double the
//!   back-off again;
//! - every task started here ends when the gateway drains (`Gateway::drain` starts closing connections; until then the gateway may still accept); the
//!   active checks also end when their [`HealthChecks`] handle is dropped.
//!
//! Passive checks skip upstreams with a single backend, which has nothing to hand its
//! connections to. They count only failures to reach the backend
//! ([`UpstreamError::is_reach_failure`]): a backend that answers, even with a refusal, is
//! up, and so is one whose connection is up but whose answer is slow or wrong (any client can
//! ask a long-poll path for an upgrade, which a healthy app never answers); the gateway's own
//! exhaustion (out of descriptors or ports) says nothing about the backend at all. After a back-off the backend is simply eligible again (half-open): the next
//! connections try it, and one more failure backs off for twice as long (up to
//! `max_backoff`) while one success resets the doubling.

use crate::config::{Backend, HealthCheck, HealthCheckKind, PassiveHealth};
use crate::drain::Phase;
use crate::gateway::Gateway;
use crate::proto::{CloseCode, FrameHeader, OpCode, close_frame};
use crate::relay::mask_keys::next_mask_key;
use crate::routing::UpstreamBalancer;
use crate::upstream::{self, BackendTls, UpstreamError, UpstreamRequest};
use std::future::{Future, poll_fn};
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, SystemTime};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinHandle;
use tokio::time::{Instant, MissedTickBehavior};

/// Sent with WebSocket probes, so backend logs can tell probes from clients.
const USER_AGENT: &[u8] = b"wsgate-health-check";

/// The running active checks; dropping this stops them.
#[derive(Debug)]
#[must_use = "the health checks stop when this is dropped"]
pub struct HealthChecks {
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for HealthChecks {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// Starts one checking task per upstream that has `health_check`. The tasks end when the
/// gateway drains or the returned handle is dropped.
pub fn start(gateway: &Arc<Gateway>) -> HealthChecks {
    let tasks = gateway
        .config
        .upstreams
        .iter()
        .enumerate()
        .filter_map(|(index, upstream)| {
            let check = upstream.health_check.clone()?;
            Some(tokio::spawn(run_checks(Arc::clone(gateway), index, check)))
        })
        .collect();
    HealthChecks { tasks }
}

async fn run_checks(gateway: Arc<Gateway>, upstream: usize, check: HealthCheck) {
    let mut drain = gateway.drain.subscribe();
    tokio::select! {
        // An error means the gateway is gone, which ends the checks just as well.
        _ = drain.wait_for(|phase| matches!(phase, Phase::Closing(_))) => {}
        () = check_forever(&gateway, upstream, &check) => {}
    }
}

/// Consecutive probe results of one backend; one of the two is always zero.
#[derive(Debug, Clone, Copy, Default)]
struct Streak {
    passed: u32,
    failed: u32,
}

async fn check_forever(gateway: &Gateway, upstream: usize, check: &HealthCheck) {
    let runtime = &gateway.upstreams[upstream];
    let balancer = &runtime.balancer;
    let mut streaks = vec![Streak::default(); balancer.backends().len()];
    let mut ticks = tokio::time::interval(check.interval);
    // A round that overran (a probe waiting for its timeout) delays the next one instead of
    // being followed by a burst of catch-up rounds.
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let outcomes = probe_all(balancer.backends(), runtime.tls.as_ref(), check).await;
        for (index, (outcome, streak)) in outcomes.into_iter().zip(&mut streaks).enumerate() {
            judge(&runtime.name, balancer, index, streak, outcome, check);
        }
    }
}

/// Counts one probe result and flips the active verdict when a threshold is reached.
fn judge(
    upstream: &str,
    balancer: &UpstreamBalancer,
    index: usize,
    streak: &mut Streak,
    outcome: Result<(), String>,
    check: &HealthCheck,
) {
    let url = &balancer.backends()[index].url;
    match outcome {
        Ok(()) => {
            streak.passed = streak.passed.saturating_add(1);
            streak.failed = 0;
            // Reading first keeps the common case (already up) from writing the shared flag.
            if streak.passed >= check.healthy_threshold
                && balancer.checks_down(index)
                && balancer.set_healthy(index, true)
            {
                let held = if balancer.in_backoff(index) {
                    " (new connections still wait for its passive back-off)"
                } else {
                    ""
                };
                tracing::info!(
                    upstream,
                    "backend {url} is up again: {} health checks passed{held}",
                    streak.passed
                );
                let why = "up: health checks pass".to_owned();
                balancer.record_change(index, SystemTime::now(), why);
            }
        }
        Err(why) => {
            streak.failed = streak.failed.saturating_add(1);
            streak.passed = 0;
            if streak.failed >= check.unhealthy_threshold
                && !balancer.checks_down(index)
                && balancer.set_healthy(index, false)
            {
                tracing::warn!(
                    upstream,
                    "backend {url} is down: {why} ({} health checks failed)",
                    streak.failed
                );
                let why = format!("down: health check failed: {why}");
                balancer.record_change(index, SystemTime::now(), why);
            } else if !balancer.checks_down(index) {
                tracing::debug!(
                    upstream,
                    "health check of backend {url} failed ({} of {}): {why}",
                    streak.failed,
                    check.unhealthy_threshold
                );
            }
        }
    }
}

/// Probes every backend at once and returns the outcomes in backend order. Polled within the
/// upstream's one task: probes are I/O-bound, and no probe outlives its round.
async fn probe_all(
    backends: &[Backend],
    tls: Option<&BackendTls>,
    check: &HealthCheck,
) -> Vec<Result<(), String>> {
    let mut probes: Vec<Pin<Box<_>>> = backends
        .iter()
        .map(|backend| Box::pin(probe(backend, tls, check)))
        .collect();
    let mut outcomes: Vec<Option<Result<(), String>>> = vec![None; backends.len()];
    poll_fn(|cx| {
        let mut pending = false;
        for (probe, outcome) in probes.iter_mut().zip(&mut outcomes) {
            if outcome.is_none() {
                match probe.as_mut().poll(cx) {
                    Poll::Ready(result) => *outcome = Some(result),
                    Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            Poll::Pending
        } else {
            Poll::Ready(())
        }
    })
    .await;
    // Every slot is filled once the join above is ready.
    outcomes.into_iter().flatten().collect()
}

/// One probe: `Ok` when the backend passed. Closing afterwards is polite but not judged.
async fn probe(
    backend: &Backend,
    tls: Option<&BackendTls>,
    check: &HealthCheck,
) -> Result<(), String> {
    let deadline = Instant::now() + check.timeout;
    let mut stream = match &check.kind {
        HealthCheckKind::Tcp => {
            match tokio::time::timeout_at(deadline, upstream::connect(backend, tls)).await {
                Ok(Ok(stream)) => stream,
                Ok(Err(error)) => return Err(error.to_string()),
                Err(_) => {
                    return Err(format!(
                        "no connection to backend {} within {:?}",
                        backend.url, check.timeout
                    ));
                }
            }
        }
        HealthCheckKind::WebSocket { path } => {
            let host = authority(backend);
            let extra: [(&str, &[u8]); 1] = [("User-Agent", USER_AGENT)];
            let request = UpstreamRequest {
                host: &host,
                target: path,
                protocols: None,
                extensions: None,
                extra: &extra,
            };
            let upgraded = upstream::open(backend, tls, check.timeout, &request)
                .await
                .map_err(|error| error.to_string())?;
            let mut stream = upgraded.stream;
            let close = close_frame(CloseCode::NORMAL, "", Some(next_mask_key()));
            let _ = tokio::time::timeout_at(deadline, async {
                if stream.write_all(close.as_bytes()).await.is_ok() {
                    await_close_reply(&mut stream, upgraded.early).await;
                }
            })
            .await;
            stream
        }
    };
    // FIN (and TLS close_notify) rather than a reset, so backends do not log an error.
    let _ = tokio::time::timeout_at(deadline, stream.shutdown()).await;
    Ok(())
}

/// `Host` for a probe: the backend's host, bracketed when IPv6, with its port unless it is
/// the scheme's default.
fn authority(backend: &Backend) -> String {
    let host = if backend.host.contains(':') {
        format!("[{}]", backend.host)
    } else {
        backend.host.clone()
    };
    let default_port = if backend.secure { 443 } else { 80 };
    if backend.port == default_port {
        host
    } else {
        format!("{host}:{}", backend.port)
    }
}

/// Reads until the backend's close frame, the end of the stream, or bytes that are no
/// WebSocket: frames before the close are skipped without being held whole.
async fn await_close_reply(stream: &mut (impl AsyncRead + Unpin), mut buf: Vec<u8>) {
    let mut skip: u64 = 0;
    let mut chunk = [0u8; 1024];
    loop {
        loop {
            let skipped = usize::try_from(skip).unwrap_or(usize::MAX).min(buf.len());
            buf.drain(..skipped);
            skip -= skipped as u64;
            if skip > 0 {
                break;
            }
            match FrameHeader::parse(&buf) {
                Ok(Some((header, _))) if header.opcode == OpCode::Close => return,
                Ok(Some((header, len))) => {
                    buf.drain(..len);
                    skip = header.payload_len;
                }
                Ok(None) => break,
                Err(_) => return,
            }
        }
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// Hands the active checks' verdicts of `old` to a reloaded `new` configuration: a backend
/// (same upstream name, same URL) that the checks hold down stays down until the new checks
/// pass it, instead of looking healthy for a moment after every reload. Only where the new
/// upstream has active checks, since nothing else would ever bring it back. Passive back-offs
/// are not carried: their timers belong to the old configuration, and a backend still
/// unreachable is taken out again by its next failed connect. An operator's drain is carried
/// when the backend's configuration is unchanged, and so is a weight an operator set.
pub fn carry_over(old: &Gateway, new: &Gateway) {
    for (upstream, config) in new.upstreams.iter().zip(&new.config.upstreams) {
        let Some(before) = old.upstreams.iter().find(|u| u.name == upstream.name) else {
            continue;
        };
        for (index, backend) in upstream.balancer.backends().iter().enumerate() {
            let Some(was) = before
                .balancer
                .backends()
                .iter()
                .position(|b| b.url == backend.url)
            else {
                continue;
            };
            // An operator's drain lasts until a reload changes that backend.
            if before.balancer.backends()[was] == *backend {
                if before.balancer.is_drained(was) {
                    upstream.balancer.set_drained(index, true);
                }
                upstream
                    .balancer
                    .set_weight(index, before.balancer.weight(was));
            }
            if config.health_check.is_some() && before.balancer.checks_down(was) {
                upstream.balancer.set_healthy(index, false);
                if let Some((at, why)) = before.balancer.last_change(was) {
                    upstream.balancer.record_change(index, at, why);
                }
            }
        }
    }
}

/// Passive check: the connection path reports how a connect to backend `backend` of upstream
/// `upstream` went. `None`, or an error the backend itself answered with (a refusal, a bad
/// handshake), proves it reachable; a connect failure starts a back-off.
pub fn observe_connect(
    gateway: &Gateway,
    upstream: usize,
    backend: usize,
    failure: Option<&UpstreamError>,
) {
    let Some(passive) = gateway.config.upstreams[upstream].passive_health else {
        return;
    };
    if gateway.upstreams[upstream].balancer.backends().len() < 2 {
        // Nothing to move to: a back-off would only turn the next quick try into a 503
        // (nginx ignores max_fails for a lone server for the same reason).
        return;
    }
    match failure {
        Some(UpstreamError::LocalResources { .. }) => {}
        Some(error) if error.is_reach_failure() => {
            connect_failed(gateway, upstream, backend, passive, &error.to_string());
        }
        _ => {
            let balancer = &gateway.upstreams[upstream].balancer;
            let ended = balancer.connect_succeeded(backend);
            if ended > 0 {
                let url = &balancer.backends()[backend].url;
                tracing::info!(
                    upstream = %gateway.upstreams[upstream].name,
                    "backend {url} is up again: a connection succeeded after {ended} failed"
                );
                let why = "up: a connection succeeded".to_owned();
                balancer.record_change(backend, SystemTime::now(), why);
            }
        }
    }
}

/// [`observe_connect`] for a connect that did not finish within `timeout` (the plain-HTTP
/// path times its connect itself).
pub fn observe_connect_timeout(
    gateway: &Gateway,
    upstream: usize,
    backend: usize,
    timeout: Duration,
) {
    let error = UpstreamError::ConnectTimeout {
        backend: gateway.upstreams[upstream].balancer.backends()[backend]
            .url
            .clone(),
        timeout,
    };
    observe_connect(gateway, upstream, backend, Some(&error));
}

fn connect_failed(
    gateway: &Gateway,
    upstream: usize,
    backend: usize,
    passive: PassiveHealth,
    why: &str,
) {
    let runtime = &gateway.upstreams[upstream];
    let balancer = &runtime.balancer;
    let Some(failures) = balancer.start_backoff(backend) else {
        return;
    };
    let backoff = passive.backoff_after(failures);
    let url = balancer.backends()[backend].url.clone();
    tracing::warn!(
        upstream = %runtime.name,
        "backend {url} is down: {why}; new connections avoid it for {backoff:?}"
    );
    let note = format!("down for {backoff:?}: {why}");
    balancer.record_change(backend, SystemTime::now(), note);

    let balancer = Arc::clone(balancer);
    let name = runtime.name.clone();
    let mut drain = gateway.drain.subscribe();
    tokio::spawn(async move {
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            // Draining: no new connections will be chosen, so the back-off may stay.
            _ = drain.wait_for(|phase| matches!(phase, Phase::Closing(_))) => return,
        }
        if balancer.end_backoff(backend) {
            tracing::info!(
                upstream = %name,
                "backend {url}: back-off of {backoff:?} over, new connections try it again"
            );
            let note = "half-open: back-off over, trying again".to_owned();
            balancer.record_change(backend, SystemTime::now(), note);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backend(host: &str, port: u16, secure: bool) -> Backend {
        Backend {
            url: String::new(),
            secure,
            host: host.to_owned(),
            port,
            base_path: String::new(),
            weight: 1,
        }
    }

    #[test]
    fn probe_host_names_the_backend() {
        assert_eq!(authority(&backend("a.internal", 80, false)), "a.internal");
        assert_eq!(authority(&backend("a.internal", 443, true)), "a.internal");
        assert_eq!(
            authority(&backend("a.internal", 443, false)),
            "a.internal:443"
        );
        assert_eq!(authority(&backend("::1", 9001, false)), "[::1]:9001");
    }

    #[test]
    fn backoff_doubles_up_to_its_maximum() {
        let passive = PassiveHealth {
            backoff: Duration::from_secs(10),
            max_backoff: Duration::from_secs(120),
        };
        let backoffs: Vec<u64> = (1..=6)
            .map(|n| passive.backoff_after(n).as_secs())
            .collect();
        assert_eq!(backoffs, [10, 20, 40, 80, 120, 120]);
        assert_eq!(passive.backoff_after(u32::MAX).as_secs(), 120);
        assert_eq!(passive.backoff_after(0).as_secs(), 10);
    }

    #[test]
    fn thresholds_flip_the_verdict_once() {
        let backends = [backend("a", 1, false), backend("b", 1, false)];
        let balancer = UpstreamBalancer::new(&backends);
        let check = HealthCheck {
            healthy_threshold: 2,
            unhealthy_threshold: 3,
            ..HealthCheck::DEFAULT
        };
        let mut streak = Streak::default();
        let fail = || Err("refused".to_owned());
        for _ in 0..2 {
            judge("u", &balancer, 0, &mut streak, fail(), &check);
            assert!(balancer.is_healthy(0));
        }
        // A pass in between restarts the count.
        judge("u", &balancer, 0, &mut streak, Ok(()), &check);
        for _ in 0..2 {
            judge("u", &balancer, 0, &mut streak, fail(), &check);
        }
        assert!(balancer.is_healthy(0));
        judge("u", &balancer, 0, &mut streak, fail(), &check);
        assert!(!balancer.is_healthy(0));
        let (_, why) = balancer.last_change(0).unwrap();
        assert!(why.contains("refused"), "{why}");
        judge("u", &balancer, 0, &mut streak, Ok(()), &check);
        assert!(!balancer.is_healthy(0));
        judge("u", &balancer, 0, &mut streak, Ok(()), &check);
        assert!(balancer.is_healthy(0));
        assert!(balancer.is_healthy(1));
    }

    #[test]
    fn a_reload_keeps_backends_the_checks_hold_down() {
        let gateway = |backends: &str, checks: bool| {
            let check = if checks {
                "    health_check: {kind: tcp}\n"
            } else {
                ""
            };
            let yaml = format!(
                "listeners:\n  - address: 127.0.0.1:0\nupstreams:\n  app:\n    backends: [{backends}]\n{check}routes:\n  - upstream: app\n"
            );
            Gateway::new(crate::config::from_yaml_str(&yaml, "t.yaml").unwrap()).unwrap()
        };
        let old = gateway("ws://a:1, ws://b:1", true);
        old.upstreams[0].balancer.set_healthy(1, false);
        old.upstreams[0].balancer.start_backoff(0);
        let at = SystemTime::UNIX_EPOCH;
        old.upstreams[0]
            .balancer
            .record_change(1, at, "down: refused".into());

        // b moved to index 0 in the new file: matched by URL, not position.
        let new = gateway("ws://b:1, ws://a:1, ws://c:1", true);
        carry_over(&old, &new);
        let balancer = &new.upstreams[0].balancer;
        assert!(balancer.checks_down(0), "b stays down");
        assert_eq!(balancer.last_change(0), Some((at, "down: refused".into())));
        assert!(balancer.is_healthy(1), "a passive back-off is not carried");
        assert!(balancer.is_healthy(2));

        // Without active checks nothing would bring it back: not carried.
        let unchecked = gateway("ws://a:1, ws://b:1", false);
        carry_over(&old, &unchecked);
        assert!(unchecked.upstreams[0].balancer.is_healthy(1));
    }

    #[test]
    fn a_reload_keeps_an_operators_drain_until_it_changes_that_backend() {
        let gateway = |backends: &str| {
            let yaml = format!(
                "listeners:\n  - address: 127.0.0.1:0\nupstreams:\n  app:\n    backends: [{backends}]\nroutes:\n  - upstream: app\n"
            );
            Gateway::new(crate::config::from_yaml_str(&yaml, "t.yaml").unwrap()).unwrap()
        };
        let old = gateway("ws://a:1, ws://b:1");
        old.upstreams[0].balancer.set_drained(0, true);
        old.upstreams[0].balancer.set_drained(1, true);
        // a unchanged (and moved), b's weight changed: only a stays drained.
        let new = gateway("ws://c:1, {url: ws://b:1, weight: 2}, ws://a:1");
        carry_over(&old, &new);
        let balancer = &new.upstreams[0].balancer;
        assert!(balancer.is_drained(2), "a, unchanged, stays drained");
        let old = gateway("ws://a:1");
        old.upstreams[0].balancer.set_weight(0, 7);
        let same = gateway("ws://a:1");
        carry_over(&old, &same);
        assert_eq!(
            same.upstreams[0].balancer.weight(0),
            7,
            "an operator's weight stays"
        );
        let changed = gateway("{url: ws://a:1, weight: 3}");
        carry_over(&old, &changed);
        assert_eq!(
            changed.upstreams[0].balancer.weight(0),
            3,
            "the file decides"
        );
        assert!(!balancer.is_drained(1), "b changed: the reload decides");
        assert!(!balancer.is_drained(0));
    }

    /// EMFILE while connecting to a backend is the gateway's own exhaustion: 503 to the
    /// client, and the backend stays in rotation (it was never asked anything).
    #[tokio::test]
    async fn local_exhaustion_never_counts_against_a_backend() {
        let yaml = "listeners:\n  - address: 127.0.0.1:0\nupstreams:\n  app:\n    backends: [ws://a:1, ws://b:1]\nroutes:\n  - upstream: app\n";
        let gateway = Gateway::new(crate::config::from_yaml_str(yaml, "t.yaml").unwrap()).unwrap();
        let backend = gateway.upstreams[0].balancer.backends()[0].clone();
        let url = backend.url.clone();
        let out_of_files = UpstreamError::LocalResources {
            backend: url.clone(),
            source: std::io::Error::from_raw_os_error(libc::EMFILE),
        };
        assert_eq!(out_of_files.status(), 503);
        assert!(!out_of_files.is_reach_failure());
        observe_connect(&gateway, 0, 0, Some(&out_of_files));
        assert!(gateway.upstreams[0].balancer.is_healthy(0));

        // A connection that is up but never answers is that request's problem.
        let answer_late = UpstreamError::AnswerTimeout {
            backend: url.clone(),
            timeout: Duration::from_secs(1),
        };
        assert_eq!(answer_late.status(), 504);
        observe_connect(&gateway, 0, 0, Some(&answer_late));
        assert!(gateway.upstreams[0].balancer.is_healthy(0));

        let refused = UpstreamError::Connect {
            backend: url,
            source: std::io::Error::from_raw_os_error(libc::ECONNREFUSED),
        };
        observe_connect(&gateway, 0, 0, Some(&refused));
        assert!(
            !gateway.upstreams[0].balancer.is_healthy(0),
            "refused is a reach failure"
        );
    }

    #[tokio::test]
    async fn waits_for_the_close_reply_only() {
        // Close reply after a data frame: stops at the close, though the stream stays open.
        let (client, mut server) = tokio::io::duplex(256);
        let mut text = vec![0x81, 3];
        text.extend_from_slice(b"bye");
        let close = [0x88, 2, 0x03, 0xe8];
        server.write_all(&text[..3]).await.unwrap();
        let mut stream = client;
        let reader = tokio::spawn(async move {
            await_close_reply(&mut stream, Vec::new()).await;
        });
        server.write_all(&text[3..]).await.unwrap();
        server.write_all(&close).await.unwrap();
        tokio::time::timeout(Duration::from_secs(10), reader)
            .await
            .expect("returns at the close frame")
            .unwrap();
    }
}
