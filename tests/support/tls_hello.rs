//! A hand-made TLS ClientHello, for tests that check what the gateway answers to a client
//! rustls itself would never be (a TLS 1.1 one).

/// A TLS record holding a ClientHello with `version` as both record and client version and
/// no supported_versions extension: how a TLS 1.1 (0x0302) or 1.2 (0x0303) client says hello.
/// `signature_algorithms` is a TLS 1.2 extension; real TLS 1.1 clients (openssl s_client
/// -tls1_1) leave it out.
pub fn raw_client_hello(version: [u8; 2], signature_algorithms: bool) -> Vec<u8> {
    fn u16_len(bytes: &[u8]) -> [u8; 2] {
        u16::try_from(bytes.len()).unwrap().to_be_bytes()
    }
    fn extension(out: &mut Vec<u8>, kind: u16, data: &[u8]) {
        out.extend_from_slice(&kind.to_be_bytes());
        out.extend_from_slice(&u16_len(data));
        out.extend_from_slice(data);
    }
    fn u16_list(values: &[u16]) -> Vec<u8> {
        let items: Vec<u8> = values.iter().flat_map(|v| v.to_be_bytes()).collect();
        [&u16_len(&items)[..], &items].concat()
    }

    let mut body = Vec::new();
    body.extend_from_slice(&version);
    body.extend_from_slice(&[0x5a; 32]); // random
    body.push(0); // empty session id
    // ECDHE-ECDSA/RSA with AES-GCM and ChaCha20 (1.2), plus AES-CBC-SHA ones a 1.1 client has.
    body.extend(u16_list(&[
        0xc02b, 0xc02f, 0xcca9, 0xcca8, 0xc009, 0xc013, 0x002f,
    ]));
    body.extend_from_slice(&[1, 0]); // compression: null only

    let mut extensions = Vec::new();
    let host = b"localhost";
    let mut sni = vec![0]; // host_name
    sni.extend_from_slice(&u16_len(host));
    sni.extend_from_slice(host);
    extension(
        &mut extensions,
        0x0000,
        &[&u16_len(&sni)[..], &sni].concat(),
    );
    extension(&mut extensions, 0x000a, &u16_list(&[0x001d, 0x0017])); // x25519, P-256
    extension(&mut extensions, 0x000b, &[1, 0]); // ec_point_formats: uncompressed
    if signature_algorithms {
        // ecdsa_secp256r1_sha256, rsa_pss_rsae_sha256, rsa_pkcs1_sha256
        extension(
            &mut extensions,
            0x000d,
            &u16_list(&[0x0403, 0x0804, 0x0401]),
        );
    }
    body.extend_from_slice(&u16_len(&extensions));
    body.extend(extensions);

    let mut handshake = vec![1]; // client_hello
    handshake.extend_from_slice(&u32::try_from(body.len()).unwrap().to_be_bytes()[1..]);
    handshake.extend(body);

    let mut record = vec![0x16]; // handshake
    record.extend_from_slice(&version);
    record.extend_from_slice(&u16_len(&handshake));
    record.extend(handshake);
    record
}
