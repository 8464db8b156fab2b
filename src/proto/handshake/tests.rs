use super::*;
use httparse::{EMPTY_HEADER, Header};

const RFC_KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

const GOOD: &str = "GET /chat?room=1 HTTP/1.1\r\nHost: server.example.com\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nOrigin: http://example.com\r\nSec-WebSocket-Protocol: chat, superchat\r\nSec-WebSocket-Protocol: v3\r\nSec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\nSec-WebSocket-Version: 13\r\n\r\n";

fn check(request: &str) -> Result<(), HandshakeError> {
    let mut storage = [EMPTY_HEADER; 32];
    let (head, _) = parse_request(request.as_bytes(), &mut storage)?.expect("complete");
    validate_upgrade(&head).map(|_| ())
}

fn replace(from: &str, to: &str) -> String {
    assert!(GOOD.contains(from), "{from}");
    GOOD.replacen(from, to, 1)
}

#[test]
fn rfc_accept_key() {
    assert_eq!(accept_key(RFC_KEY), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
}

#[test]
fn good_request_validates_and_exposes_offers() {
    let mut storage = [EMPTY_HEADER; 32];
    let (head, len) = parse_request(GOOD.as_bytes(), &mut storage)
        .unwrap()
        .unwrap();
    assert_eq!(len, GOOD.len());
    assert_eq!((head.path(), head.query()), ("/chat", Some("room=1")));
    let upgrade = validate_upgrade(&head).unwrap();
    assert_eq!(upgrade.host, "server.example.com");
    assert_eq!(upgrade.key, RFC_KEY);
    assert_eq!(upgrade.origin, Some("http://example.com"));
    let protocols: Vec<_> = server::offered_protocols(head.headers).collect();
    assert_eq!(protocols, ["chat", "superchat", "v3"]);
    let extensions: Vec<_> = server::offered_extensions(head.headers).collect();
    assert_eq!(
        extensions,
        [Extension {
            name: "permessage-deflate",
            params: "client_max_window_bits"
        }]
    );
}

#[test]
fn every_prefix_of_a_request_is_incomplete() {
    for cut in 0..GOOD.len() {
        let mut storage = [EMPTY_HEADER; 32];
        assert!(
            parse_request(&GOOD.as_bytes()[..cut], &mut storage)
                .unwrap()
                .is_none(),
            "cut {cut}"
        );
    }
}

#[test]
fn header_tokens_are_case_insensitive() {
    let request = replace("Upgrade: websocket", "upgrade: WebSocket")
        .replace("keep-alive, Upgrade", "UPGRADE");
    assert_eq!(check(&request), Ok(()));
}

#[test]
fn each_requirement_has_its_status() {
    let cases: Vec<(String, HandshakeError, u16)> = vec![
        (replace("GET ", "POST "), HandshakeError::MethodNotGet, 405),
        (
            replace("HTTP/1.1", "HTTP/1.0"),
            HandshakeError::NotHttp11,
            400,
        ),
        (
            replace("Host: server.example.com\r\n", ""),
            HandshakeError::BadHost,
            400,
        ),
        (
            replace("Host: server.example.com\r\n", "Host: a\r\nHost: b\r\n"),
            HandshakeError::BadHost,
            400,
        ),
        (
            replace("Upgrade: websocket", "Upgrade: h2c"),
            HandshakeError::UpgradeNotWebSocket,
            400,
        ),
        (
            replace("keep-alive, Upgrade", "keep-alive"),
            HandshakeError::ConnectionNotUpgrade,
            400,
        ),
        (
            replace("Version: 13", "Version: 8"),
            HandshakeError::UnsupportedVersion,
            426,
        ),
        (
            replace("Sec-WebSocket-Version: 13\r\n", ""),
            HandshakeError::UnsupportedVersion,
            426,
        ),
        (
            replace(RFC_KEY, "dGhlIHNhbXBsZSBub25j"),
            HandshakeError::BadKey,
            400,
        ),
        (
            replace(RFC_KEY, "dGhlIHNhbXBsZSBub25jZQ=!"),
            HandshakeError::BadKey,
            400,
        ),
        // 17 bytes of base64 is 24 chars too but decodes to more than 16 bytes.
        (
            replace(RFC_KEY, "dGhlIHNhbXBsZSBub25jZQ"),
            HandshakeError::BadKey,
            400,
        ),
        (
            replace("Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n", ""),
            HandshakeError::BadKey,
            400,
        ),
        (
            replace(
                "Origin:",
                &format!("Sec-WebSocket-Key: {RFC_KEY}\r\nOrigin:"),
            ),
            HandshakeError::BadKey,
            400,
        ),
        (
            replace("chat, superchat", "chat, super chat"),
            HandshakeError::BadSubprotocol,
            400,
        ),
        (
            replace("Origin:", "Content-Length: 5\r\nOrigin:"),
            HandshakeError::HasBody,
            400,
        ),
        (
            replace("Origin:", "Transfer-Encoding: chunked\r\nOrigin:"),
            HandshakeError::HasBody,
            400,
        ),
    ];
    for (request, error, status) in cases {
        assert_eq!(check(&request), Err(error.clone()), "{request}");
        assert_eq!(error.status(), status);
    }
}

#[test]
fn an_empty_body_announced_as_such_is_no_body() {
    let request = GOOD.replacen("Origin:", "Content-Length: 0\r\nOrigin:", 1);
    assert!(check(&request).is_ok(), "{request}");
}

#[test]
fn too_many_headers_is_431() {
    let many = GOOD.replacen("\r\n\r\n", &"\r\nX-Filler: 1".repeat(40), 1) + "\r\n\r\n";
    assert_eq!(check(&many).unwrap_err().status(), 431);
}

#[test]
fn garbage_is_a_400_not_a_panic() {
    for garbage in [
        "\0\0\0\r\n\r\n",
        "GET\r\n\r\n",
        "GET / HTTP/9.9\r\n\r\n",
        "GET / HTTP/1.1\r\nBad Header\r\n\r\n",
    ] {
        let err = check(garbage).unwrap_err();
        assert_eq!(err.status(), 400, "{garbage:?}: {err}");
    }
}

#[test]
fn error_response_names_the_problem_in_one_line() {
    let mut out = Vec::new();
    write_error_response(&mut out, &HandshakeError::UnsupportedVersion);
    let text = String::from_utf8(out).unwrap();
    assert!(
        text.starts_with("HTTP/1.1 426 Upgrade Required\r\n"),
        "{text}"
    );
    assert!(text.contains("\r\nSec-WebSocket-Version: 13\r\n"));
    let body = text.split("\r\n\r\n").nth(1).unwrap();
    assert_eq!(body, "Sec-WebSocket-Version must be 13\n");
    assert!(text.contains(&format!("Content-Length: {}\r\n", body.len())));
}

#[test]
fn accept_response_carries_the_choice() {
    let mut out = Vec::new();
    write_accept_response(
        &mut out,
        RFC_KEY,
        Some("chat"),
        None,
        &[("Set-Cookie", "a=b")],
    );
    let text = String::from_utf8(out).unwrap();
    assert_eq!(
        text,
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\nSec-WebSocket-Protocol: chat\r\nSet-Cookie: a=b\r\n\r\n"
    );
}

fn response(lines: &str) -> (Vec<Header<'static>>, u16) {
    let text: &'static str = Box::leak(format!("{lines}\r\n").into_boxed_str());
    let mut storage = vec![EMPTY_HEADER; 16];
    let (head, _) = parse_response(text.as_bytes(), &mut storage)
        .unwrap()
        .unwrap();
    let status = head.status;
    let count = head.headers.len();
    storage.truncate(count);
    (storage, status)
}

fn validate(
    lines: &str,
    protocols: Option<&str>,
    extensions: Option<&str>,
) -> Result<Option<String>, ClientHandshakeError> {
    let (headers, status) = response(lines);
    let head = ResponseHead {
        status,
        reason: "",
        headers: &headers,
    };
    validate_response(&head, RFC_KEY, protocols, extensions).map(|n| n.protocol.map(str::to_owned))
}

const OK_101: &str = "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n";

#[test]
fn client_validates_the_backend_response() {
    assert_eq!(validate(OK_101, None, None), Ok(None));
    let chosen = format!("{OK_101}Sec-WebSocket-Protocol: superchat\r\n");
    assert_eq!(
        validate(&chosen, Some("chat, superchat"), None),
        Ok(Some("superchat".into()))
    );
    assert_eq!(
        validate(&chosen, Some("chat"), None),
        Err(ClientHandshakeError::UnofferedProtocol)
    );
    assert_eq!(
        validate(&chosen, None, None),
        Err(ClientHandshakeError::UnofferedProtocol)
    );
    let bad_accept = OK_101.replace(
        "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=",
        "AAAAAAAAAAAAAAAAAAAAAAAAAAA=",
    );
    assert_eq!(
        validate(&bad_accept, None, None),
        Err(ClientHandshakeError::BadAccept)
    );
    let no_upgrade = OK_101.replace("Upgrade: websocket\r\n", "");
    assert_eq!(
        validate(&no_upgrade, None, None),
        Err(ClientHandshakeError::MissingUpgrade)
    );
    let refused = "HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n";
    assert_eq!(
        validate(refused, None, None),
        Err(ClientHandshakeError::Rejected { status: 403 })
    );
    let ext = format!("{OK_101}Sec-WebSocket-Extensions: permessage-deflate\r\n");
    assert_eq!(
        validate(&ext, None, None),
        Err(ClientHandshakeError::UnofferedExtension)
    );
    assert_eq!(
        validate(
            &ext,
            None,
            Some("permessage-deflate; client_max_window_bits")
        ),
        Ok(None)
    );
}

#[test]
fn client_request_is_a_valid_upgrade() {
    let key = key_from_random([7; 16]);
    let mut out = Vec::new();
    let extra: [(&str, &[u8]); 1] = [("Origin", b"https://app")];
    write_request(
        &mut out,
        &ClientRequest {
            host: "backend:9001",
            target: "/rooms/a?x=1",
            key: &key,
            protocols: Some("chat, v2"),
            extensions: None,
            extra: &extra,
        },
    );
    let mut storage = [EMPTY_HEADER; 32];
    let (head, len) = parse_request(&out, &mut storage).unwrap().unwrap();
    assert_eq!(len, out.len());
    let upgrade = validate_upgrade(&head).unwrap();
    assert_eq!(
        (upgrade.host, upgrade.key, upgrade.origin),
        ("backend:9001", key.as_str(), Some("https://app"))
    );
    assert_eq!(head.target, "/rooms/a?x=1");
    assert_eq!(
        server::offered_protocols(head.headers).collect::<Vec<_>>(),
        ["chat", "v2"]
    );
}

#[test]
fn a_101s_end_to_end_headers_pass_and_hop_by_hop_and_handshake_headers_do_not() {
    let text =
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade, X-Hop\r\n\
        Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\nSec-WebSocket-Protocol: chat\r\n\
        Set-Cookie: sid=1; HttpOnly\r\nX-Hop: per hop\r\nKeep-Alive: timeout=5\r\n\
        Transfer-Encoding: chunked\r\nContent-Length: 0\r\nset-cookie: theme=dark\r\n\
        X-App: v2 \r\nSEC-WEBSOCKET-EXTENSIONS: permessage-deflate\r\nX-Bin: \xff\r\n\r\n";
    let mut storage = [EMPTY_HEADER; 32];
    let (head, _) = parse_response(text, &mut storage).unwrap().unwrap();
    let kept = end_to_end_headers(head.headers);
    let kept: Vec<(&str, &str)> = kept.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect();
    assert_eq!(
        kept,
        [
            ("Set-Cookie", "sid=1; HttpOnly"),
            ("set-cookie", "theme=dark"),
            ("X-App", "v2"),
        ]
    );
}
