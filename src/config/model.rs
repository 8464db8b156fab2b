//! The validated, typed configuration: what the rest of the gateway consumes.
//!
//! Invariants (established by `validate`, relied on everywhere else):
//! - every `Route::upstream` indexes into `Config::upstreams`;
//! - every upstream has at least one backend and every weight is at least 1;
//! - every duration and size is within the documented bounds of its key;
//! - health thresholds are at least 1 and `PassiveHealth::max_backoff >= backoff`;
//! - listener addresses are unique.
//!
//! Nothing here knows about YAML: `raw.rs` is the only file that names the YAML crate.

use crate::client_addr::TrustedNetworks;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// The whole configuration file, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub listeners: Vec<Listener>,
    pub upstreams: Vec<Upstream>,
    /// Ordered: the first route whose match applies wins.
    pub routes: Vec<Route>,
    /// Gateway-wide defaults; routes may override them.
    pub timeouts: Timeouts,
    pub limits: Limits,
    pub admin: Option<Admin>,
    pub sessions: Sessions,
    /// Shutdown (SIGTERM, SIGINT).
    pub drain: Drain,
    /// Moving connections whose sticky key changed backend.
    pub rebalance: Rebalance,
    /// Several instances acting as one: session requests forwarded to their owner.
    pub cluster: Option<Cluster>,
}

/// Where the gateway listens for clients.
#[derive(Debug, Clone, PartialEq)]
pub struct Listener {
    pub name: String,
    pub address: SocketAddr,
    pub tls: Option<ServerTls>,
    /// Every connection starts with a PROXY protocol header (v1 or v2) naming the client;
    /// only connections from `trusted_proxies` are accepted.
    pub proxy_protocol: bool,
    /// Where a PROXY header, `X-Forwarded-For` or `Forwarded` is believed from (empty: nowhere).
    pub trusted_proxies: TrustedNetworks,
}

/// TLS termination on a listener. The first certificate is the default one,
/// served when the client sends no SNI or a name no certificate lists.
#[derive(Debug, Clone, PartialEq)]
pub struct ServerTls {
    pub certificates: Vec<CertificateFiles>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct CertificateFiles {
    /// PEM file holding the leaf certificate followed by its chain.
    pub cert: PathBuf,
    /// PEM file holding the private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// SNI names this certificate is served for (`*.example.com` allowed).
    /// Empty means "the names in the certificate are not consulted; default only".
    pub server_names: Vec<String>,
}

/// A named pool of backends that routes point at.
#[derive(Debug, Clone, PartialEq)]
pub struct Upstream {
    pub name: String,
    /// With `dns`, the set the last lookup gave (empty until the first one answers).
    pub backends: Vec<Backend>,
    /// Backends taken from DNS instead of the file.
    pub dns: Option<DnsBackends>,
    pub connect_timeout: Duration,
    /// TLS settings for `wss://` backends.
    pub tls: UpstreamTls,
    /// Active checks; `None`: backends are judged by real connections only.
    pub health_check: Option<HealthCheck>,
    /// Passive checks; `None`: a failed connect never takes a backend out of rotation.
    pub passive_health: Option<PassiveHealth>,
}

/// An upstream whose backends are what a DNS name resolves to, looked up again after the
/// answer's TTL, held between `min_interval` and `max_interval`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsBackends {
    pub lookup: DnsLookup,
    /// `wss://` backends.
    pub secure: bool,
    /// Path prefix of every backend, as in a backend URL.
    pub base_path: String,
    /// The name server asked; `None`: the system's (`/etc/resolv.conf`).
    pub resolver: Option<SocketAddr>,
    pub min_interval: Duration,
    pub max_interval: Duration,
}

impl DnsBackends {
    /// Whether `other` asks the same question of the same server (only the intervals may
    /// differ), so the answer to one is the answer to the other.
    pub fn same_question(&self, other: &Self) -> bool {
        (&self.lookup, self.secure, &self.base_path, self.resolver)
            == (
                &other.lookup,
                other.secure,
                &other.base_path,
                other.resolver,
            )
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DnsLookup {
    /// `A` and `AAAA` records of `name`, each address with `port`.
    Address { name: String, port: u16 },
    /// `SRV` records of `name` (the lowest priority's targets, their ports and weights).
    Srv { name: String },
}

impl DnsLookup {
    pub fn name(&self) -> &str {
        match self {
            Self::Address { name, .. } | Self::Srv { name } => name,
        }
    }
}

/// Active health checks of an upstream's backends: each backend is probed every `interval`;
/// `unhealthy_threshold` consecutive failures take it out of rotation and
/// `healthy_threshold` consecutive successes bring it back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheck {
    pub kind: HealthCheckKind,
    pub interval: Duration,
    /// A probe not done within this long fails.
    pub timeout: Duration,
    /// At least 1.
    pub healthy_threshold: u32,
    /// At least 1.
    pub unhealthy_threshold: u32,
}

/// What one probe does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HealthCheckKind {
    /// Connect (and complete TLS for `wss://`), then close.
    Tcp,
    /// Connect and complete a WebSocket handshake on `path` (appended to the backend's base
    /// path, like a client's path; starts with `/`), then close with 1000.
    WebSocket { path: String },
}

/// Passive health: a connect that fails (refused, timed out, TLS failed) takes the backend out
/// for `backoff`, doubled after each further failure up to `max_backoff` (never less than
/// `backoff`); a connect that works resets it. Ignored for an upstream with one backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PassiveHealth {
    pub backoff: Duration,
    pub max_backoff: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Backend {
    /// As written in the config: `ws://host:port[/base]` or `wss://...`. Also the
    /// backend's identity for consistent hashing, so it must not be rewritten.
    pub url: String,
    pub secure: bool,
    pub host: String,
    pub port: u16,
    /// Path prefix prepended to the client's path (empty or starting with `/`, no trailing `/`).
    pub base_path: String,
    pub weight: u32,
}

impl Backend {
    /// Weights are 1 to this: enough for any share, small enough that scores stay exact.
    pub const MAX_WEIGHT: u32 = 1000;
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct UpstreamTls {
    /// `None`: the operating system's roots (the bundled Mozilla roots where there are none).
    /// `Some`: only this CA bundle.
    pub ca_file: Option<PathBuf>,
    /// SNI / certificate name to verify instead of the URL's host.
    pub server_name: Option<String>,
}

/// One routing rule.
#[derive(Debug, Clone, PartialEq)]
pub struct Route {
    pub name: String,
    /// Exact host (`chat.example.com`), wildcard (`*.example.com`) or `None` for any host.
    /// Compared case-insensitively, without the port.
    pub host: Option<String>,
    /// Matches when the request path starts with it; always starts with `/`.
    pub path_prefix: String,
    /// Index into `Config::upstreams`.
    pub upstream: usize,
    pub sticky: Option<StickyKey>,
    pub sticky_cookie: Option<StickyCookie>,
    /// Empty means any origin (and requests without `Origin`) is allowed.
    pub allowed_origins: Vec<String>,
    pub compression: Compression,
    /// Forward pings and pongs end to end instead of answering them per hop.
    pub ping_passthrough: bool,
    /// When the chosen backend cannot be reached (refused, TCP or TLS connect timeout), how
    /// many other backends are tried, each the key's next choice, before answering 502/504.
    /// Only WebSocket upgrades, sessions and idempotent HTTP requests are retried.
    pub connect_retries: u8,
    /// Route-level values, already merged over the gateway-wide defaults.
    pub timeouts: Timeouts,
    pub limits: Limits,
    /// Who may open a connection on this route (`None`: anyone).
    pub auth: Option<Auth>,
}

/// Authentication on a route, checked on the handshake before any backend is contacted and
/// enforced for the life of the connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Auth {
    Jwt(JwtAuth),
    Forward(ForwardAuth),
}

impl Auth {
    /// The JWT settings, for a route authenticated by tokens.
    pub fn jwt(&self) -> Option<&JwtAuth> {
        match self {
            Auth::Jwt(jwt) => Some(jwt),
            Auth::Forward(_) => None,
        }
    }
}

/// `auth.forward`: an auth service asked about each handshake, like nginx `auth_request` or
/// Traefik ForwardAuth.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForwardAuth {
    /// As written: `http://` or `https://host[:port]/path`.
    pub url: String,
    pub secure: bool,
    pub host: String,
    pub port: u16,
    /// Path and query, starting with `/`.
    pub path: String,
    /// For `https://`: trust only this CA bundle (default: the system's roots).
    pub ca_file: Option<PathBuf>,
    /// The auth service's whole answer (connect, request, body) within this long, or 503.
    pub timeout: Duration,
    /// Client request headers sent to the auth service (lowercase); also the cache key.
    pub request_headers: Vec<String>,
    /// Auth service response headers copied to the backend request (the client's own copies
    /// of these names are removed). Names as written.
    pub response_headers: Vec<String>,
    /// The auth service response header naming who was admitted (lowercase): a session
    /// opened with it is bound to that subject.
    pub subject_header: Option<String>,
    /// How long an admission is remembered for the same credentials (0: not at all).
    pub cache_ttl: Duration,
    /// How long a 401/403 is remembered for the same credentials (0: not at all).
    pub negative_cache_ttl: Duration,
}

/// `auth.jwt`: a signed JSON Web Token (RFC 7519) the client presents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JwtAuth {
    /// Where the token is looked for, in this order; the first one present is the token.
    pub from: Vec<TokenSource>,
    /// Verification keys; at least one.
    pub keys: Vec<JwtKey>,
    /// The `iss` the token must carry, when set.
    pub issuer: Option<String>,
    /// The token's `aud` must name one of these, when not empty.
    pub audience: Vec<String>,
    /// Clock skew allowed on `exp` and `nbf`, both at the handshake and for the connection.
    pub leeway: Duration,
    /// Claims a valid token must carry; a token without one is refused with 403.
    pub require: Vec<String>,
    /// Request headers set from claims for the backend (`X-User-Id: sub`); the client's own
    /// headers of these names are always removed. Header names as written.
    pub headers: Vec<(String, String)>,
    /// The close code the client gets when its token expires (the backend gets 1001).
    pub expired_close_code: u16,
    /// Connections one subject (`sub`) may hold open on the route at once.
    pub max_connections_per_subject: Option<u32>,
    /// A WebSocket client may present a new token in-band before expiry (see
    /// `relay::credentials`).
    pub refresh: bool,
}

/// Where a token may come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenSource {
    /// `Authorization: Bearer <token>` (RFC 6750 §2.1).
    Bearer,
    /// A cookie of this name.
    Cookie(String),
    /// A query parameter of this name; removed from the target the backend sees.
    Query(String),
    /// An entry of the `Sec-WebSocket-Protocol` offer starting with this prefix, the token
    /// after it; the entry is removed from the offer the backend sees.
    Subprotocol(String),
}

/// One verification key source and the algorithms it may verify.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JwtKey {
    pub source: JwtKeySource,
    /// Algorithms accepted with this key; for a JWKS, those of keys without an `alg` (a JWK
    /// with its own `alg` is used for that one only). Never empty for PEM and secret keys.
    pub algorithms: Vec<JwtAlgorithm>,
    /// Matched against the token's `kid`; a key without one is tried for any token.
    pub kid: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JwtKeySource {
    /// A PEM public key (RSA, EC or Ed25519).
    Pem(PathBuf),
    /// A JSON Web Key Set file (RFC 7517).
    Jwks(PathBuf),
    /// A file whose bytes are an HMAC secret.
    Secret(PathBuf),
    /// A JSON Web Key Set fetched over HTTPS, cached and refreshed.
    JwksUrl(JwksUrl),
}

/// `jwks_url`: where an issuer publishes its keys, and how they are kept fresh.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JwksUrl {
    /// As written: `https://host[:port]/path`.
    pub url: String,
    pub host: String,
    pub port: u16,
    /// Path and query, starting with `/`.
    pub path: String,
    /// Trust only this CA bundle (default: the system's roots).
    pub ca_file: Option<PathBuf>,
    /// Keys older than this are fetched again (in the background; the old set serves on).
    pub refresh: Duration,
    /// A token naming an unknown `kid` fetches the set again, at most once per `cooldown`.
    pub cooldown: Duration,
    /// A fetch (connect, TLS, request, body) not done within this long fails.
    pub timeout: Duration,
}

/// The signature algorithms a route may accept (RFC 7518, RFC 8037). `none` is not one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum JwtAlgorithm {
    HS256,
    HS384,
    HS512,
    RS256,
    RS384,
    RS512,
    PS256,
    PS384,
    PS512,
    ES256,
    ES384,
    EdDSA,
}

impl JwtAlgorithm {
    pub const ALL: [JwtAlgorithm; 12] = [
        Self::HS256,
        Self::HS384,
        Self::HS512,
        Self::RS256,
        Self::RS384,
        Self::RS512,
        Self::PS256,
        Self::PS384,
        Self::PS512,
        Self::ES256,
        Self::ES384,
        Self::EdDSA,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            Self::HS256 => "HS256",
            Self::HS384 => "HS384",
            Self::HS512 => "HS512",
            Self::RS256 => "RS256",
            Self::RS384 => "RS384",
            Self::RS512 => "RS512",
            Self::PS256 => "PS256",
            Self::PS384 => "PS384",
            Self::PS512 => "PS512",
            Self::ES256 => "ES256",
            Self::ES384 => "ES384",
            Self::EdDSA => "EdDSA",
        }
    }

    /// Which kind of key verifies it: algorithms of one family share a key.
    pub const fn family(self) -> KeyFamily {
        match self {
            Self::HS256 | Self::HS384 | Self::HS512 => KeyFamily::Hmac,
            Self::RS256 | Self::RS384 | Self::RS512 | Self::PS256 | Self::PS384 | Self::PS512 => {
                KeyFamily::Rsa
            }
            Self::ES256 | Self::ES384 => KeyFamily::Ec,
            Self::EdDSA => KeyFamily::Ed,
        }
    }
}

/// The kind of key an algorithm needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyFamily {
    Hmac,
    Rsa,
    Ec,
    Ed,
}

impl Route {
    /// One more backend, like HAProxy's `retries 1` with `option redispatch`.
    pub const DEFAULT_CONNECT_RETRIES: u8 = 1;
    /// Each attempt may wait up to the connect timeout: a bound on what one client costs.
    pub const MAX_CONNECT_RETRIES: u8 = 3;
}

/// Where a route's sticky key comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StickyKey {
    /// `path: "/rooms/{room}"`: the path segment at `index` (0-based, after the leading `/`),
    /// the one named in braces in the pattern. `pattern` keeps the text for display.
    PathSegment { pattern: String, index: usize },
    /// `query: room`
    Query(String),
    /// `header: X-Room` (stored lowercase)
    Header(String),
    /// `cookie: session`
    Cookie(String),
    /// `client_ip: true`
    ClientIp,
    /// `claim: sub`: a claim of the route's verified token. The claim must be mapped to a
    /// header in `auth.jwt.headers`; the key is read from that header, which the gateway sets
    /// from the verified token after removing the client's own (lowercase `header`).
    Claim { claim: String, header: String },
}

/// An affinity cookie set by the gateway for routes without a natural key, so a browser's
/// later requests reach the same backend (HAProxy `cookie ... insert`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StickyCookie {
    pub name: String,
    /// `None`: a session cookie.
    pub max_age: Option<Duration>,
    pub same_site: SameSite,
    /// `Secure`: `None` sets it on TLS listeners only. `SameSite=None` always has it, since
    /// browsers refuse such a cookie without it.
    pub secure: Option<bool>,
}

impl StickyCookie {
    /// Whether the cookie carries `Secure` when set on a connection that is (or is not) TLS.
    pub fn is_secure(&self, tls: bool) -> bool {
        self.same_site == SameSite::None || self.secure.unwrap_or(tls)
    }
}

/// The affinity cookie's `SameSite` attribute.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SameSite {
    Strict,
    /// Sent on top-level navigations from other sites, not on their subrequests.
    #[default]
    Lax,
    None,
}

impl SameSite {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Strict => "Strict",
            Self::Lax => "Lax",
            Self::None => "None",
        }
    }
}

/// permessage-deflate handling.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Compression {
    /// Remove the client's offer towards the backend: frames are never compressed.
    #[default]
    Strip,
    /// Let the negotiation through; compressed frames are relayed as they are, and inflated
    /// on the side only to hold `max_frame`/`max_message` to what they decompress to.
    Passthrough,
    /// The gateway negotiates with the client itself, inflates what the client sends and
    /// deflates what the backend sends; the backend never sees compression.
    Terminate(Deflate),
}

/// How a `terminate` route compresses, and what it asks of clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deflate {
    /// A fresh compressor per message towards the client (no state held between messages).
    pub server_no_context_takeover: bool,
    /// Asks the client for the same, so no inflate state is held between its messages.
    pub client_no_context_takeover: bool,
    /// Window of what the gateway compresses, 9..=15 bits.
    pub server_max_window_bits: u8,
    /// Window asked of clients that offer to limit theirs, 8..=15 bits.
    pub client_max_window_bits: u8,
    /// Backend messages smaller than this go to the client uncompressed (RFC 7692 lets each
    /// message choose): below it, deflate's framing costs more than it saves.
    pub min_size: u32,
    /// zlib level, 1 (fastest) ..= 9 (smallest).
    pub level: u8,
}

impl Deflate {
    pub const DEFAULT_MIN_SIZE: u32 = 64;
    /// zlib's own default trades ratio and speed well; chat-sized messages gain little above.
    pub const DEFAULT_LEVEL: u8 = 6;
}

impl Default for Deflate {
    /// No context takeover either way and 2 KiB windows: idle connections hold no compression
    /// state (see README, Compression).
    fn default() -> Self {
        Self {
            server_no_context_takeover: true,
            client_no_context_takeover: true,
            server_max_window_bits: 11,
            client_max_window_bits: 11,
            min_size: Self::DEFAULT_MIN_SIZE,
            level: Self::DEFAULT_LEVEL,
        }
    }
}

/// Timeouts. A `None` disables the timer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// From accept to a complete request head (and TLS handshake).
    pub handshake: Duration,
    /// A connection with no data frame in either direction for this long is closed (1001).
    pub idle: Option<Duration>,
    /// A hop silent for this long is pinged.
    pub ping_interval: Option<Duration>,
    /// A ping not answered within this long fails the hop.
    pub pong_timeout: Duration,
    /// How long to wait for the peer's close reply before completing the handshake ourselves.
    pub close: Duration,
    /// A proxied HTTP request body that sends nothing for this long is answered 408 and its
    /// backend request cancelled (nginx's `client_body_timeout`).
    pub body: Duration,
    /// The longest a proxied HTTP request body may take in all, if set.
    pub body_total: Option<Duration>,
}

/// Size and count limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest accepted frame payload, bytes (RFC 6455 close code 1009 above it).
    pub max_frame: u64,
    /// Largest accepted message (sum of its fragments), bytes (1009 above it).
    pub max_message: u64,
    /// Concurrent client connections (per route when set on a route, in total at top level).
    pub max_connections: u32,
    /// Largest accepted HTTP request head, bytes (431 above it).
    pub max_header_bytes: usize,
    /// Concurrent connections from one client IP address (top level only; `None`: no limit).
    pub max_connections_per_ip: Option<u32>,
    /// New WebSocket handshakes per second, gateway-wide, with a burst of one second's worth
    /// (top level only; `None`: no limit). Against reconnect storms after a deploy or outage.
    pub handshake_rate: Option<u32>,
    /// Messages per second a client may send on one connection, with a burst of two seconds'
    /// worth; excess closes the connection with 1008 (`None`: no limit).
    pub message_rate: Option<u32>,
    /// Compression state the gateway's connections may hold between messages (context
    /// takeover on `terminate` routes), bytes, gateway-wide (top level only). Beyond it new
    /// connections are answered without compression.
    pub compression_memory: u64,
}

/// How the gateway shuts down: every connection is asked to close (1001), then the gateway
/// waits for the closing handshakes at most `deadline` before it exits anyway.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Drain {
    /// From the shutdown signal, how long `/readyz` answers 503 while everything is still
    /// accepted and served, so that load balancers take the instance out of rotation first.
    pub readiness_delay: Duration,
    /// Then, with the listeners closed, how long WebSocket connections and sessions take to
    /// close: each room at one instant, the instants spread evenly, so clients do not all
    /// reconnect in the same second. 0 closes everything at once.
    pub spread: Duration,
    /// From the shutdown signal, when the process exits whatever is still open; at least
    /// `readiness_delay + spread`. 0 exits as soon as the close frames are written.
    pub deadline: Duration,
}

impl Drain {
    /// Fits a Kubernetes rolling update with the default `terminationGracePeriodSeconds` of
    /// 30 s: 5 s for the endpoint removal to reach the load balancers, 15 s of spread closes,
    /// then up to 5 s for the last closing handshakes (the close timeout), and 5 s to spare
    /// before SIGKILL.
    pub const DEFAULT: Drain = Drain {
        readiness_delay: Duration::from_secs(5),
        spread: Duration::from_secs(15),
        deadline: Duration::from_secs(25),
    };
}

impl Default for Drain {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// Room-safe rebalancing: when a reload or a health change gives a sticky key another
/// backend, the connections still on the old one are closed with 1012 so that they reconnect
/// to the new owner; each key at one random instant within `window`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rebalance {
    /// `false`: connections stay where they are until they end by themselves.
    pub enabled: bool,
    /// Moved keys are closed at random instants spread over this long (0: at once).
    pub window: Duration,
    /// Also rebalance when a backend's health changes (not only on reloads).
    pub on_health_change: bool,
}

impl Rebalance {
    pub const DEFAULT: Rebalance = Rebalance {
        enabled: true,
        // Long enough that thousands of reconnects do not arrive as one spike, short enough
        // that a room is not split between two backends for long.
        window: Duration::from_secs(10),
        on_health_change: true,
    };
}

impl Default for Rebalance {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// The admin listener (metrics, health, dashboard).
#[derive(Debug, Clone, PartialEq)]
pub struct Admin {
    pub address: SocketAddr,
    /// The bearer token of the admin API (`/api/...`); without one the API is off. The
    /// other admin endpoints (metrics, health, dashboard) need none.
    pub token: Option<AdminToken>,
    pub tls: Option<ServerTls>,
}

impl Admin {
    /// What a reload cannot change: the socket and how it is served. The token may change.
    pub fn listener_eq(&self, other: &Admin) -> bool {
        self.address == other.address && self.tls == other.tls
    }
}

/// A secret: never printed, compared in constant time.
#[derive(Clone, PartialEq, Eq)]
pub struct AdminToken(String);

impl AdminToken {
    /// Shorter tokens can be guessed by anyone who can reach the admin listener.
    pub const MIN_LEN: usize = 16;

    pub fn new(token: &str) -> Result<Self, String> {
        if token.len() < Self::MIN_LEN {
            return Err(format!(
                "the admin token must be at least {} characters (it has {})",
                Self::MIN_LEN,
                token.len()
            ));
        }
        if !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err("the admin token must be printable ASCII without spaces".to_owned());
        }
        Ok(Self(token.to_owned()))
    }

    /// Whether `offered` is this token, in time that depends only on its length.
    pub fn matches(&self, offered: &[u8]) -> bool {
        let expected = self.0.as_bytes();
        expected.len() == offered.len()
            && expected
                .iter()
                .zip(offered)
                .fold(0u8, |diff, (a, b)| diff | (a ^ b))
                == 0
    }
}

impl std::fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AdminToken(..)")
    }
}

/// The session layer: long-polling fallback and resumable sessions (docs/sessions.md).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sessions {
    /// Serve the session protocol on every route; when off, its requests are proxied like any
    /// other request.
    pub enabled: bool,
    /// Names this gateway in session ids' `instance` field, so a front load balancer can send a
    /// session's requests to the gateway that holds it.
    pub instance: String,
    /// How long a long-poll is held when there is nothing to send.
    pub poll_timeout: Duration,
    /// How long a session survives with no client attached: the expiry of an abandoned
    /// long-polling session and the grace period for a resume.
    pub timeout: Duration,
    /// Backend-to-client payload bytes buffered per session, unacknowledged ones included.
    pub buffer: u64,
    /// Most sessions open at once, gateway-wide (503 above it).
    pub max_sessions: u32,
    /// Largest POST body and (roughly) poll answer, bytes.
    pub max_batch: u64,
    /// Most sessions one client address holds at once (429 above it). Each session also holds
    /// one of the address's `limits.max_connections_per_ip` slots for its whole life.
    pub max_sessions_per_ip: u32,
    /// New sessions a second per client address, with bursts of two seconds' worth (429 above).
    pub open_rate: u32,
    /// How long a session request's body may take to arrive (408 after it).
    pub body_timeout: Duration,
}

impl Sessions {
    pub fn with_defaults() -> Self {
        Self {
            enabled: true,
            instance: default_instance(),
            // Socket.IO's pingInterval and most proxies' 30-60 s idle cuts: a held poll must
            // come back before an intermediary gives up on it.
            poll_timeout: Duration::from_secs(25),
            // Long enough for a phone to switch networks or a laptop to wake up.
            timeout: Duration::from_secs(30),
            buffer: 1 << 20,
            max_sessions: 10_000,
            max_batch: 1 << 20,
            // A page opens one session per tab; a few dozen covers a household or an office
            // behind one NAT address without letting one address hold a route's backends.
            max_sessions_per_ip: 32,
            // Reconnecting clients open a new session at most every few hundred milliseconds.
            open_rate: 10,
            // nginx's client_body_timeout is 60 s between reads; a session body is at most
            // `max_batch` and usually tiny, so a whole body gets less.
            body_timeout: Duration::from_secs(10),
        }
    }
}

/// The host name, so instances differ without configuration in the common one-per-host case.
fn default_instance() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|name| name.trim().to_owned())
        .filter(|name| {
            !name.is_empty()
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
        })
        .unwrap_or_else(|| "wsgate".to_owned())
}

impl Timeouts {
    pub const DEFAULT: Timeouts = Timeouts {
        // Long enough for a slow mobile TLS handshake, short enough that a trickling client
        // (slowloris) cannot hold a socket for long. nginx's client_header_timeout is 60 s;
        // WebSocket clients send one small request, so we are stricter.
        handshake: Duration::from_secs(10),
        // nginx's proxy_read_timeout default is 60 s, which kills quiet WebSockets; real-time
        // apps are quiet for minutes, and keepalive pings detect dead peers instead.
        idle: None,
        // Below the 60 s idle cut of most load balancers and NATs.
        ping_interval: Some(Duration::from_secs(30)),
        pong_timeout: Duration::from_secs(10),
        close: Duration::from_secs(5),
        // nginx's client_body_timeout: a client that stops sending for this long is not
        // uploading any more, it is holding a slot and a backend request.
        body: Duration::from_secs(60),
        // Uploads vary too much in size for one default bound on their whole length.
        body_total: None,
    };
}

impl Limits {
    pub const DEFAULT: Limits = Limits {
        // tungstenite's defaults: large enough for any real-time payload, small enough that a
        // malicious peer cannot make the gateway account for gigabytes.
        max_frame: 16 << 20,
        max_message: 64 << 20,
        max_connections: 9_000,
        max_header_bytes: 16 << 10,
        max_connections_per_ip: None,
        handshake_rate: None,
        message_rate: None,
        // About 1,200 connections with context takeover both ways at 11-bit windows (218 KiB
        // each, measured); without it (the default) connections hold nothing between messages.
        compression_memory: 256 << 20,
    };
}

impl HealthCheck {
    pub const DEFAULT: HealthCheck = HealthCheck {
        kind: HealthCheckKind::Tcp,
        // Frequent enough to notice a dead backend within seconds, rare enough that a
        // hundred backends cost nothing.
        interval: Duration::from_secs(5),
        timeout: Duration::from_secs(2),
        healthy_threshold: 1,
        // One lost probe (a dropped SYN, a GC pause) must not take a backend out.
        unhealthy_threshold: 2,
    };
}

impl PassiveHealth {
    /// Short enough that a restarted backend is back within seconds of being ready; the
    /// doubling keeps a dead one from costing a failed client connection every 10 s.
    pub const DEFAULT: PassiveHealth = PassiveHealth {
        backoff: Duration::from_secs(10),
        max_backoff: Duration::from_secs(120),
    };

    /// The back-off after the `failures`-th consecutive failure (1 for the first):
    /// `backoff * 2^(failures - 1)`, at most `max_backoff`.
    pub fn backoff_after(&self, failures: u32) -> Duration {
        let doublings = failures.saturating_sub(1).min(31);
        self.backoff
            .saturating_mul(1 << doublings)
            .min(self.max_backoff)
            .max(self.backoff)
    }
}

impl Default for Timeouts {
    fn default() -> Self {
        Self::DEFAULT
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// This instance among its peers (`cluster:`): session requests for a session another
/// instance owns are forwarded to it over an authenticated internal hop.
#[derive(Debug, Clone, PartialEq)]
pub struct Cluster {
    /// This instance's name: the `instance` of its session ids.
    pub name: String,
    /// Where peers reach this instance (`host:port`), when given; checked against its own
    /// entry in `peers`.
    pub address: Option<String>,
    /// The other instances. The list may name this instance too (one list shared by every
    /// instance); that entry is skipped. With `peers_dns`, the latest answer's addresses
    /// (each named by its IP), this instance's own left out.
    pub peers: Vec<Peer>,
    /// The peers are the `A`/`AAAA` answer for this name (on `DnsLookup::Address`'s port),
    /// looked up again like an upstream's `dns` (`secure` and `base_path` unused); every
    /// instance is then named by the IP its peers reach it on.
    pub peers_dns: Option<DnsBackends>,
    pub secret: PeerSecret,
    /// The listener reserved for peer traffic (index into `listeners`): peer requests are
    /// accepted there only, and client requests are refused there. `None`: peer requests
    /// are accepted on every listener, authenticated like anywhere.
    pub listener: Option<usize>,
    /// Peers are reached over TLS, their certificates verified with these settings (their
    /// peer listeners serve TLS). `None`: plain TCP.
    pub tls: Option<UpstreamTls>,
}

impl Cluster {
    /// The peers for resolved `addresses` (`peers_dns`): each named by its IP, ordered,
    /// without repeats and without this instance.
    pub fn peers_at(&self, addresses: impl IntoIterator<Item = SocketAddr>) -> Vec<Peer> {
        let mut addresses: Vec<SocketAddr> = addresses.into_iter().collect();
        addresses.sort_unstable();
        addresses.dedup();
        addresses
            .into_iter()
            .map(|address| Peer {
                name: address.ip().to_string(),
                address: address.to_string(),
            })
            .filter(|peer| peer.name != self.name)
            .collect()
    }

    /// The address of the peer named `name`, only from the configured list: a session id
    /// can name an instance, never an address.
    pub fn peer(&self, name: &str) -> Option<&Peer> {
        self.peers.iter().find(|peer| peer.name == name)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub name: String,
    /// `host:port`, resolved when connecting (a StatefulSet pod's DNS name, or an address).
    pub address: String,
}

/// The secret peers prove with every forwarded request: never printed, compared in constant
/// time.
#[derive(Clone, PartialEq, Eq)]
pub struct PeerSecret(String);

impl PeerSecret {
    /// Long enough that guessing it over the network is hopeless.
    pub const MIN_LEN: usize = 32;

    pub fn new(secret: &str) -> Result<Self, String> {
        if secret.len() < Self::MIN_LEN {
            return Err(format!(
                "the cluster secret must be at least {} characters (it has {})",
                Self::MIN_LEN,
                secret.len()
            ));
        }
        if !secret.bytes().all(|b| b.is_ascii_graphic()) {
            return Err("the cluster secret must be printable ASCII without spaces".to_owned());
        }
        Ok(Self(secret.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether `offered` is this secret, in time that depends only on its length.
    pub fn matches(&self, offered: &[u8]) -> bool {
        let expected = self.0.as_bytes();
        expected.len() == offered.len()
            && expected
                .iter()
                .zip(offered)
                .fold(0u8, |diff, (a, b)| diff | (a ^ b))
                == 0
    }
}

impl std::fmt::Debug for PeerSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PeerSecret(..)")
    }
}
