//! The `auth:` section of a route. Only the shape is checked here (key files are read when
//! the gateway is built, like TLS certificates), so a configuration stays a value without I/O.

use super::{
    Cx, Fields, TimerRule, check_cookie_name, check_query_name, check_token, split_host_port,
};
use crate::config::lines::YamlPath;
use crate::config::model::{
    Auth, ForwardAuth, JwksUrl, JwtAlgorithm, JwtAuth, JwtKey, JwtKeySource, KeyFamily, StickyKey,
    TokenSource,
};
use crate::config::raw::Raw;
use std::time::Duration;

const AUTH_KEYS: &[&str] = &["jwt", "forward"];
const FORWARD_KEYS: &[&str] = &[
    "url",
    "ca_file",
    "timeout",
    "request_headers",
    "response_headers",
    "subject_header",
    "cache_ttl",
    "negative_cache_ttl",
];
/// An auth service answers in milliseconds; seconds mean it is down, and the client waits.
const DEFAULT_FORWARD_TIMEOUT: Duration = Duration::from_secs(5);
/// A cached verdict outlives a revocation by this long at most: off unless configured.
const MAX_CACHE_TTL: Duration = Duration::from_secs(3600);
const JWT_KEYS: &[&str] = &[
    "from",
    "keys",
    "issuer",
    "audience",
    "leeway",
    "require",
    "headers",
    "expired_close_code",
    "max_connections_per_subject",
    "refresh",
];
const KEY_KEYS: &[&str] = &[
    "pem",
    "jwks",
    "jwks_url",
    "secret_file",
    "algorithms",
    "kid",
    "ca_file",
    "refresh",
    "cooldown",
    "timeout",
];
const KEY_SOURCES: &[&str] = &["pem", "jwks", "jwks_url", "secret_file"];
/// Keys only a `jwks_url` takes.
const URL_KEYS: &[&str] = &["ca_file", "refresh", "cooldown", "timeout"];
/// Issuers rotate keys over days; ten minutes picks a new key up soon without load on them.
const DEFAULT_REFRESH: Duration = Duration::from_secs(600);
/// At most one fetch per five seconds for tokens naming unknown keys: a client making up key
/// ids cannot turn the gateway against the issuer.
const DEFAULT_COOLDOWN: Duration = Duration::from_secs(5);
const DEFAULT_FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// Clock skew beyond this is a broken clock, not skew; it would also keep expired tokens
/// alive for that long.
const MAX_LEEWAY: Duration = Duration::from_secs(300);
/// A few seconds absorb ordinary skew between the issuer's clock and ours.
const DEFAULT_LEEWAY: Duration = Duration::from_secs(5);
/// "Policy violation" (RFC 6455 §7.4.1): the client is no longer entitled to the connection.
const DEFAULT_EXPIRED_CLOSE: u16 = 1008;
/// A sanity bound on the lists a route may name.
const MAX_ITEMS: usize = 64;

impl Cx<'_> {
    pub(super) fn auth(&mut self, raw: &Raw, path: &YamlPath) -> Option<Auth> {
        let f = self.fields(raw, path, "a mapping with jwt or forward", AUTH_KEYS)?;
        match (f.get("jwt"), f.get("forward")) {
            (Some((raw, jwt_path)), None) => self.jwt(raw, &jwt_path).map(Auth::Jwt),
            (None, Some((raw, forward_path))) => {
                self.forward(raw, &forward_path).map(Auth::Forward)
            }
            (None, None) => {
                self.err(path, "expected one of: jwt, forward (found none)");
                None
            }
            (Some(_), Some((_, forward_path))) => {
                self.err(
                    &forward_path,
                    "a route takes either jwt or forward, not both",
                );
                None
            }
        }
    }

    fn forward(&mut self, raw: &Raw, path: &YamlPath) -> Option<ForwardAuth> {
        let f = self.fields(raw, path, "a mapping with url", FORWARD_KEYS)?;
        let url = f
            .required(self, "url", "the auth service's http:// or https:// URL")
            .and_then(|(raw, path)| {
                let text = self.string(raw, &path, "an http:// or https:// URL")?;
                let parsed = parse_url(text, false);
                self.checked(&path, parsed)
                    .map(|parsed| (text.to_owned(), parsed))
            });
        let ca_file = match f.get("ca_file") {
            None => Some(None),
            Some((raw, path)) => self.file(raw, &path).map(Some),
        };
        let timeout = match f.get("timeout") {
            None => Some(DEFAULT_FORWARD_TIMEOUT),
            Some((raw, path)) => self
                .timer(raw, &path, super::TIMER)
                .map(Option::unwrap_or_default),
        };
        let names = |cx: &mut Self, key: &str| match f.get(key) {
            None => Some(None),
            Some((raw, path)) => {
                let list = cx.strings(raw, &path, "header names")?;
                let mut ok = true;
                for (i, name) in list.iter().enumerate() {
                    let checked = check_token(name, "header name");
                    ok &= cx.checked(&path.index(i), checked).is_some();
                }
                ok.then_some(Some(list))
            }
        };
        let request_headers = names(self, "request_headers").map(|list| {
            list.unwrap_or_else(|| vec!["authorization".into(), "cookie".into()])
                .into_iter()
                .map(|name| name.to_ascii_lowercase())
                .collect::<Vec<_>>()
        });
        let response_headers = names(self, "response_headers").map(Option::unwrap_or_default);
        if let (Some(list), Some((_, list_path))) = (&response_headers, f.get("response_headers")) {
            for (i, name) in list.iter().enumerate() {
                if crate::forwarded::is_dropped(name, &[], true) {
                    self.err(
                        &list_path.index(i),
                        format!("{name} is a header the gateway sets or removes itself"),
                    );
                }
            }
        }
        let subject_header = match f.get("subject_header") {
            None => Some(None),
            Some((raw, path)) => self.string(raw, &path, "a header name").and_then(|name| {
                let checked = check_token(name, "header name");
                self.checked(&path, checked)
                    .map(|name| Some(name.to_ascii_lowercase()))
            }),
        };
        let ttl = |cx: &mut Self, key: &str| match f.get(key) {
            None => Some(Duration::ZERO),
            Some((raw, path)) => {
                let rule = TimerRule {
                    disableable: true,
                    zero_ok: true,
                    max: MAX_CACHE_TTL,
                };
                cx.timer(raw, &path, rule).map(Option::unwrap_or_default)
            }
        };
        let cache_ttl = ttl(self, "cache_ttl");
        let negative_cache_ttl = ttl(self, "negative_cache_ttl");
        let (url, (secure, host, port, url_path)) = url?;
        Some(ForwardAuth {
            url,
            secure,
            host,
            port,
            path: url_path,
            ca_file: ca_file?,
            timeout: timeout?,
            request_headers: request_headers?,
            response_headers: response_headers?,
            subject_header: subject_header?,
            cache_ttl: cache_ttl?,
            negative_cache_ttl: negative_cache_ttl?,
        })
    }

    fn jwt(&mut self, raw: &Raw, path: &YamlPath) -> Option<JwtAuth> {
        let f = self.fields(raw, path, "a mapping with keys", JWT_KEYS)?;
        let from = match f.get("from") {
            None => Some(vec![TokenSource::Bearer]),
            Some((raw, path)) => self.token_sources(raw, &path),
        };
        let keys = f
            .required(self, "keys", "a list of keys (pem, jwks or secret_file)")
            .and_then(|(raw, path)| self.jwt_keys(raw, &path));
        let issuer = match f.get("issuer") {
            None => Some(None),
            Some((raw, path)) => self
                .string(raw, &path, "an issuer")
                .map(|s| Some(s.to_owned())),
        };
        let audience = match f.get("audience") {
            None => Some(Vec::new()),
            Some((Raw::Str(s), _)) if !s.trim().is_empty() => Some(vec![s.clone()]),
            Some((raw, path)) => self.strings(raw, &path, "audiences"),
        };
        let leeway = match f.get("leeway") {
            None => Some(DEFAULT_LEEWAY),
            Some((raw, path)) => {
                let rule = TimerRule {
                    disableable: false,
                    zero_ok: true,
                    max: MAX_LEEWAY,
                };
                self.timer(raw, &path, rule).map(Option::unwrap_or_default)
            }
        };
        let require = match f.get("require") {
            None => Some(Vec::new()),
            Some((raw, path)) => self.strings(raw, &path, "claim names"),
        };
        let headers = match f.get("headers") {
            None => Some(Vec::new()),
            Some((raw, path)) => self.claim_headers(raw, &path),
        };
        let expired_close_code = match f.get("expired_close_code") {
            None => Some(DEFAULT_EXPIRED_CLOSE),
            Some((raw, path)) => {
                // 1000-1014 less those never sent, and the application range; what a client
                // may legitimately receive.
                let code = self.integer(raw, &path, 1000, 4999)?;
                let code = u16::try_from(code).ok()?;
                if matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999) {
                    Some(code)
                } else {
                    self.err(
                        &path,
                        format!(
                            "{code} cannot be sent in a close frame (use 1008, another of 1000-1003 and 1007-1014, or 3000-4999)"
                        ),
                    );
                    None
                }
            }
        };
        let max_connections_per_subject = match f.get("max_connections_per_subject") {
            None => Some(None),
            Some((raw, path)) => self.optional_count(raw, &path, 1, 1_000_000),
        };
        let refresh = match f.get("refresh") {
            None => Some(false),
            Some((raw, path)) => self.boolean(raw, &path),
        };
        Some(JwtAuth {
            refresh: refresh?,
            from: from?,
            keys: keys?,
            issuer: issuer?,
            audience: audience?,
            leeway: leeway?,
            require: require?,
            headers: headers?,
            expired_close_code: expired_close_code?,
            max_connections_per_subject: max_connections_per_subject?,
        })
    }

    /// A non-empty list of non-empty strings.
    fn strings(&mut self, raw: &Raw, path: &YamlPath, what: &str) -> Option<Vec<String>> {
        let items = self.nonempty_list(raw, path, what)?;
        if items.len() > MAX_ITEMS {
            self.err(path, format!("at most {MAX_ITEMS} {what}"));
            return None;
        }
        let mut out = Vec::with_capacity(items.len());
        let mut ok = true;
        for (i, item) in items.iter().enumerate() {
            match self.string(item, &path.index(i), what) {
                Some(s) => out.push(s.to_owned()),
                None => ok = false,
            }
        }
        ok.then_some(out)
    }

    fn token_sources(&mut self, raw: &Raw, path: &YamlPath) -> Option<Vec<TokenSource>> {
        let what = "token sources (bearer, {cookie: NAME}, {query: NAME}, {subprotocol: PREFIX})";
        let items = self.nonempty_list(raw, path, what)?;
        let mut out = Vec::with_capacity(items.len());
        let mut ok = true;
        for (i, item) in items.iter().enumerate() {
            let item_path = path.index(i);
            match self.token_source(item, &item_path) {
                Some(source) if out.contains(&source) => {
                    self.err(&item_path, "this token source is listed twice");
                    ok = false;
                }
                Some(source) => out.push(source),
                None => ok = false,
            }
        }
        ok.then_some(out)
    }

    fn token_source(&mut self, raw: &Raw, path: &YamlPath) -> Option<TokenSource> {
        let what = "bearer, or a mapping with one of cookie, query, subprotocol";
        match raw {
            Raw::Str(s) if s == "bearer" => return Some(TokenSource::Bearer),
            Raw::Map(entries) if entries.len() == 1 => {}
            other => {
                self.expected(path, what, other);
                return None;
            }
        }
        let f = self.fields(raw, path, what, &["cookie", "query", "subprotocol"])?;
        if let Some((raw, path)) = f.get("cookie") {
            let name = self.string(raw, &path, "a cookie name")?;
            let checked = check_cookie_name(name);
            return self.checked(&path, checked).map(TokenSource::Cookie);
        }
        if let Some((raw, path)) = f.get("query") {
            let name = self.string(raw, &path, "a query parameter name")?;
            let checked = check_query_name(name);
            return self.checked(&path, checked).map(TokenSource::Query);
        }
        let (raw, path) = f.get("subprotocol")?;
        let prefix = self.string(raw, &path, "a subprotocol prefix such as bearer.")?;
        // The prefix is part of an HTTP token; the token after it is checked at run time.
        let checked = check_token(prefix, "subprotocol prefix");
        self.checked(&path, checked).map(TokenSource::Subprotocol)
    }

    fn jwt_keys(&mut self, raw: &Raw, path: &YamlPath) -> Option<Vec<JwtKey>> {
        let items = self.nonempty_list(raw, path, "keys")?;
        if items.len() > MAX_ITEMS {
            self.err(path, format!("at most {MAX_ITEMS} keys"));
            return None;
        }
        let mut out = Vec::with_capacity(items.len());
        let mut ok = true;
        for (i, item) in items.iter().enumerate() {
            match self.jwt_key(item, &path.index(i)) {
                Some(key) => out.push(key),
                None => ok = false,
            }
        }
        ok.then_some(out)
    }

    fn jwt_key(&mut self, raw: &Raw, path: &YamlPath) -> Option<JwtKey> {
        let what = "a mapping with one of pem, jwks, secret_file, and algorithms";
        let f = self.fields(raw, path, what, KEY_KEYS)?;
        let present: Vec<&str> = KEY_SOURCES.iter().copied().filter(|k| f.has(k)).collect();
        let [kind] = present.as_slice() else {
            self.err(
                path,
                format!(
                    "expected exactly one of: {} (found {})",
                    KEY_SOURCES.join(", "),
                    if present.is_empty() {
                        "none".to_owned()
                    } else {
                        present.join(" and ")
                    }
                ),
            );
            return None;
        };
        let (file_raw, file_path) = f.get(kind)?;
        if *kind != "jwks_url" {
            for key in URL_KEYS.iter().filter(|k| f.has(k)) {
                self.err(&path.key(key), format!("{key} applies to jwks_url only"));
            }
        }
        if *kind == "jwks_url" {
            let url = self.jwks_url(&f, file_raw, &file_path);
            let algorithms = match f.get("algorithms") {
                None => Some(Vec::new()),
                Some((raw, path)) => self.algorithms(raw, &path),
            };
            if f.has("kid") {
                self.err(
                    &path.key("kid"),
                    "a key set names its keys itself (kid applies to pem and secret_file)",
                );
                return None;
            }
            return Some(JwtKey {
                source: JwtKeySource::JwksUrl(url?),
                algorithms: algorithms?,
                kid: None,
            });
        }
        let file = self.file(file_raw, &file_path);
        let algorithms = match f.get("algorithms") {
            None => Some(Vec::new()),
            Some((raw, path)) => self.algorithms(raw, &path),
        };
        let kid = match f.get("kid") {
            None => Some(None),
            Some((raw, path)) => self
                .string(raw, &path, "a key id")
                .map(|s| Some(s.to_owned())),
        };
        let (file, algorithms, kid) = (file?, algorithms?, kid?);
        let source = match *kind {
            "pem" => JwtKeySource::Pem(file),
            "jwks" => JwtKeySource::Jwks(file),
            _ => JwtKeySource::Secret(file),
        };
        let family = |a: &JwtAlgorithm| a.family();
        let needs_algorithms = !matches!(source, JwtKeySource::Jwks(_));
        if needs_algorithms && algorithms.is_empty() {
            self.err(
                &path.key("algorithms"),
                "required key is missing (expected the algorithms this key verifies, such as [ES256])",
            );
            return None;
        }
        if let Some(first) = algorithms.first() {
            if algorithms.iter().any(|a| family(a) != family(first)) {
                self.err(
                    &path.key("algorithms"),
                    "one key verifies algorithms of one kind only (HS*, RS*/PS*, ES*, or EdDSA)",
                );
                return None;
            }
            let secret = matches!(source, JwtKeySource::Secret(_));
            if secret != (first.family() == KeyFamily::Hmac)
                && !matches!(source, JwtKeySource::Jwks(_))
            {
                let why = if secret {
                    "a secret_file verifies HS256, HS384 or HS512 only"
                } else {
                    "a pem public key verifies RS*, PS*, ES* or EdDSA (HS* need secret_file)"
                };
                self.err(&path.key("algorithms"), why);
                return None;
            }
        }
        Some(JwtKey {
            source,
            algorithms,
            kid,
        })
    }

    fn jwks_url(&mut self, f: &Fields<'_>, raw: &Raw, path: &YamlPath) -> Option<JwksUrl> {
        let text = self.string(raw, path, "an https:// URL")?;
        let parsed = parse_url(text, true);
        let (_, host, port, url_path) = self.checked(path, parsed)?;
        let ca_file = match f.get("ca_file") {
            None => Some(None),
            Some((raw, path)) => self.file(raw, &path).map(Some),
        };
        let mut timer = |key: &str, default: Duration, min: Duration| -> Option<Duration> {
            let Some((raw, path)) = f.get(key) else {
                return Some(default);
            };
            let rule = TimerRule {
                disableable: false,
                zero_ok: false,
                max: super::MAX_TIMER,
            };
            let value = self.timer(raw, &path, rule)??;
            if value < min {
                self.err(&path, format!("must be at least {}ms", min.as_millis()));
                return None;
            }
            Some(value)
        };
        let refresh = timer("refresh", DEFAULT_REFRESH, Duration::from_secs(1));
        let cooldown = timer("cooldown", DEFAULT_COOLDOWN, Duration::from_millis(100));
        let timeout = timer("timeout", DEFAULT_FETCH_TIMEOUT, Duration::from_millis(100));
        Some(JwksUrl {
            url: text.to_owned(),
            host,
            port,
            path: url_path,
            ca_file: ca_file?,
            refresh: refresh?,
            cooldown: cooldown?,
            timeout: timeout?,
        })
    }

    fn algorithms(&mut self, raw: &Raw, path: &YamlPath) -> Option<Vec<JwtAlgorithm>> {
        let names = JwtAlgorithm::ALL.map(JwtAlgorithm::name).join(", ");
        let items = self.nonempty_list(raw, path, "algorithms")?;
        let mut out = Vec::new();
        let mut ok = true;
        for (i, item) in items.iter().enumerate() {
            let item_path = path.index(i);
            let found = match item {
                Raw::Str(s) => JwtAlgorithm::ALL.into_iter().find(|a| a.name() == s),
                _ => None,
            };
            match found {
                Some(a) if !out.contains(&a) => out.push(a),
                Some(_) => {}
                None => {
                    // `none` lands here too: unsigned tokens are never accepted.
                    self.expected(&item_path, &format!("one of {names}"), item);
                    ok = false;
                }
            }
        }
        ok.then_some(out)
    }

    fn claim_headers(&mut self, raw: &Raw, path: &YamlPath) -> Option<Vec<(String, String)>> {
        let Raw::Map(entries) = raw else {
            self.expected(
                path,
                "a mapping of header names to claims (X-User-Id: sub)",
                raw,
            );
            return None;
        };
        let mut out: Vec<(String, String)> = Vec::with_capacity(entries.len());
        let mut ok = true;
        for (header, claim) in entries {
            let entry_path = path.key(header);
            let name = self.checked(&entry_path, check_token(header, "header name"));
            let claim = self.string(claim, &entry_path, "a claim name");
            match (name, claim) {
                (Some(name), Some(claim)) => {
                    if crate::forwarded::is_dropped(&name, &[], true) {
                        self.err(
                            &entry_path,
                            format!("{name} is a header the gateway sets or removes itself"),
                        );
                        ok = false;
                    } else if out.iter().any(|(n, _)| n.eq_ignore_ascii_case(&name)) {
                        self.err(&entry_path, format!("header {name} is listed twice"));
                        ok = false;
                    } else {
                        out.push((name, claim.to_owned()));
                    }
                }
                _ => ok = false,
            }
        }
        ok.then_some(out)
    }

    /// `sticky: {claim: ...}` reads the header the claim is mapped to: checked once both the
    /// sticky key and the auth section are known.
    pub(super) fn resolve_claim_sticky(
        &mut self,
        sticky: &mut Option<StickyKey>,
        auth: Option<&Auth>,
        path: &YamlPath,
    ) -> bool {
        let Some(StickyKey::Claim { claim, header }) = sticky else {
            return true;
        };
        let mapped = auth.and_then(Auth::jwt).and_then(|jwt| {
            jwt.headers
                .iter()
                .find(|(_, c)| c == claim)
                .map(|(h, _)| h.to_ascii_lowercase())
        });
        match mapped {
            Some(mapped) => {
                *header = mapped;
                true
            }
            None => {
                self.err(
                    &path.key("claim"),
                    format!(
                        "routing by claim {claim:?} needs auth.jwt with the claim mapped to a header (headers: {{X-User-Id: {claim}}})"
                    ),
                );
                false
            }
        }
    }
}

/// `https://host[:port][/path]` (or `http://` unless `https_only`): whether it is https, host,
/// port (443 or 80 by default) and path with query.
fn parse_url(url: &str, https_only: bool) -> Result<(bool, String, u16, String), String> {
    let bad = |why: &str| Err(format!("invalid URL {url:?}: {why}"));
    let (secure, rest) = match (url.strip_prefix("https://"), url.strip_prefix("http://")) {
        (Some(rest), _) => (true, rest),
        (None, Some(rest)) if !https_only => (false, rest),
        _ if https_only => return bad("keys are fetched over https:// only"),
        _ => return bad("expected http:// or https://"),
    };
    if url.contains('#') || url.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return bad("no fragment, spaces or control characters");
    }
    let (authority, path) = match rest.find(['/', '?']) {
        Some(at) => (&rest[..at], &rest[at..]),
        None => (rest, "/"),
    };
    if authority.contains('@') {
        return bad("no user information");
    }
    let (host, port) =
        split_host_port(authority).map_err(|why| format!("invalid URL {url:?}: {why}"))?;
    if host.is_empty() {
        return bad("no host");
    }
    let path = if path.starts_with('?') {
        format!("/{path}")
    } else {
        path.to_owned()
    };
    let default_port = if secure { 443 } else { 80 };
    Ok((secure, host.to_owned(), port.unwrap_or(default_port), path))
}
