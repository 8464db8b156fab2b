//! Every rule and algorithm, with keys from tests/keys/ and keys rcgen generates here.

use super::*;
use crate::auth::keys::{parse_jwks, pem_key};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use jsonwebtoken::{EncodingKey, Header};
use serde_json::json;

const NOW: u64 = 1_800_000_000;
const RSA_PRIVATE: &str = include_str!("../../../tests/keys/rsa_private.pem");
const RSA_PUBLIC: &str = include_str!("../../../tests/keys/rsa_public.pem");
const EC_PRIVATE: &str = include_str!("../../../tests/keys/ec_private.pem");
const EC_PUBLIC: &str = include_str!("../../../tests/keys/ec_public.pem");
const ED_PRIVATE: &str = include_str!("../../../tests/keys/ed_private.pem");
const ED_PUBLIC: &str = include_str!("../../../tests/keys/ed_public.pem");
const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef-test-only";

fn rules() -> Rules {
    Rules {
        issuer: None,
        audience: Vec::new(),
        leeway: 0,
        require: Vec::new(),
    }
}

fn claims() -> Value {
    json!({"sub": "alice", "exp": NOW + 60})
}

fn sign(alg: JwtAlgorithm, kid: Option<&str>, claims: &Value, key: &EncodingKey) -> String {
    let mut header = Header::new(algorithm(alg));
    header.kid = kid.map(str::to_owned);
    jsonwebtoken::encode(&header, claims, key).unwrap()
}

fn hmac_key(algorithms: &[JwtAlgorithm]) -> Key {
    Key {
        kid: None,
        algorithms: algorithms.to_vec(),
        decoding: DecodingKey::from_secret(SECRET),
    }
}

fn rsa_key(algorithms: &[JwtAlgorithm]) -> Key {
    pem_key(RSA_PUBLIC.as_bytes(), algorithms, None).unwrap()
}

fn check(token: &str, keys: &[Key], rules: &Rules) -> Result<Verified, Rejection> {
    verify(token, keys, rules, NOW)
}

#[test]
fn every_configured_algorithm_verifies_its_own_signatures() {
    use JwtAlgorithm::*;
    let secret = EncodingKey::from_secret(SECRET);
    for alg in [HS256, HS384, HS512] {
        let token = sign(alg, None, &claims(), &secret);
        let verified = check(&token, &[hmac_key(&[alg])], &rules()).unwrap();
        assert_eq!(verified.subject.as_deref(), Some("alice"), "{alg:?}");
    }
    let rsa = EncodingKey::from_rsa_pem(RSA_PRIVATE.as_bytes()).unwrap();
    for alg in [RS256, RS384, RS512, PS256, PS384, PS512] {
        let token = sign(alg, None, &claims(), &rsa);
        assert!(
            check(&token, &[rsa_key(&[alg])], &rules()).is_ok(),
            "{alg:?}"
        );
    }
    let ec = EncodingKey::from_ec_pem(EC_PRIVATE.as_bytes()).unwrap();
    let token = sign(ES256, None, &claims(), &ec);
    let key = pem_key(EC_PUBLIC.as_bytes(), &[ES256], None).unwrap();
    assert!(check(&token, &[key], &rules()).is_ok());
    let p384 = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
    let signer = EncodingKey::from_ec_pem(p384.serialize_pem().as_bytes()).unwrap();
    let token = sign(ES384, None, &claims(), &signer);
    let key = pem_key(p384.public_key_pem().as_bytes(), &[ES384], None).unwrap();
    assert!(check(&token, &[key], &rules()).is_ok());
    let ed = EncodingKey::from_ed_pem(ED_PRIVATE.as_bytes()).unwrap();
    let token = sign(EdDSA, None, &claims(), &ed);
    let key = pem_key(ED_PUBLIC.as_bytes(), &[EdDSA], None).unwrap();
    assert!(check(&token, &[key], &rules()).is_ok());
}

#[test]
fn an_algorithm_not_configured_for_the_key_is_refused() {
    let rsa = EncodingKey::from_rsa_pem(RSA_PRIVATE.as_bytes()).unwrap();
    let token = sign(JwtAlgorithm::PS256, None, &claims(), &rsa);
    assert_eq!(
        check(&token, &[rsa_key(&[JwtAlgorithm::RS256])], &rules()),
        Err(Rejection::Algorithm)
    );
    // The classic confusion: an HMAC "signed" with the RSA public key's text.
    let confused = EncodingKey::from_secret(RSA_PUBLIC.as_bytes());
    let token = sign(JwtAlgorithm::HS256, None, &claims(), &confused);
    assert_eq!(
        check(&token, &[rsa_key(&[JwtAlgorithm::RS256])], &rules()),
        Err(Rejection::Algorithm)
    );
}

#[test]
fn an_unsigned_token_never_passes() {
    let header = B64.encode(br#"{"alg":"none","typ":"JWT"}"#);
    let payload = B64.encode(claims().to_string());
    for token in [
        format!("{header}.{payload}."),
        format!("{header}.{payload}"),
    ] {
        let result = check(&token, &[hmac_key(&[JwtAlgorithm::HS256])], &rules());
        assert_eq!(result, Err(Rejection::Malformed), "{token}");
    }
    assert_eq!(
        check("not a token", &[hmac_key(&[JwtAlgorithm::HS256])], &rules()),
        Err(Rejection::Malformed)
    );
}

#[test]
fn a_tampered_payload_breaks_the_signature() {
    let token = sign(
        JwtAlgorithm::HS256,
        None,
        &claims(),
        &EncodingKey::from_secret(SECRET),
    );
    let mut parts: Vec<&str> = token.split('.').collect();
    let forged = B64.encode(json!({"sub": "mallory", "exp": NOW + 60}).to_string());
    parts[1] = &forged;
    let forged = parts.join(".");
    assert_eq!(
        check(&forged, &[hmac_key(&[JwtAlgorithm::HS256])], &rules()),
        Err(Rejection::Signature)
    );
    let other = EncodingKey::from_secret(b"another secret of at least thirty-two bytes");
    let token = sign(JwtAlgorithm::HS256, None, &claims(), &other);
    assert_eq!(
        check(&token, &[hmac_key(&[JwtAlgorithm::HS256])], &rules()),
        Err(Rejection::Signature)
    );
}

#[test]
fn a_kid_selects_its_key_and_an_unknown_kid_is_refused() {
    let secret = EncodingKey::from_secret(SECRET);
    let keys = [
        Key {
            kid: Some("old".into()),
            algorithms: vec![JwtAlgorithm::HS256],
            decoding: DecodingKey::from_secret(b"the old secret, thirty-two bytes long"),
        },
        Key {
            kid: Some("new".into()),
            algorithms: vec![JwtAlgorithm::HS256],
            decoding: DecodingKey::from_secret(SECRET),
        },
    ];
    let token = sign(JwtAlgorithm::HS256, Some("new"), &claims(), &secret);
    assert!(check(&token, &keys, &rules()).is_ok());
    let token = sign(JwtAlgorithm::HS256, Some("old"), &claims(), &secret);
    assert_eq!(check(&token, &keys, &rules()), Err(Rejection::Signature));
    let token = sign(JwtAlgorithm::HS256, Some("gone"), &claims(), &secret);
    assert_eq!(check(&token, &keys, &rules()), Err(Rejection::UnknownKey));
}

#[test]
fn expiry_is_exact_to_the_second_and_leeway_extends_it() {
    let secret = EncodingKey::from_secret(SECRET);
    let keys = [hmac_key(&[JwtAlgorithm::HS256])];
    let at = |exp: u64| sign(JwtAlgorithm::HS256, None, &json!({"exp": exp}), &secret);
    assert_eq!(
        check(&at(NOW - 1), &keys, &rules()),
        Err(Rejection::Expired)
    );
    assert_eq!(check(&at(NOW), &keys, &rules()), Err(Rejection::Expired));
    let ok = check(&at(NOW + 1), &keys, &rules()).unwrap();
    assert_eq!(ok.valid_until, Some(NOW + 1));
    let lenient = Rules {
        leeway: 5,
        ..rules()
    };
    let ok = check(&at(NOW - 1), &keys, &lenient).unwrap();
    assert_eq!(ok.valid_until, Some(NOW + 4));
    assert_eq!(
        check(&at(NOW - 5), &keys, &lenient),
        Err(Rejection::Expired)
    );
    let text = sign(JwtAlgorithm::HS256, None, &json!({"exp": "soon"}), &secret);
    assert_eq!(check(&text, &keys, &rules()), Err(Rejection::Malformed));
}

#[test]
fn not_before_is_honoured_with_leeway() {
    let secret = EncodingKey::from_secret(SECRET);
    let keys = [hmac_key(&[JwtAlgorithm::HS256])];
    let token = sign(
        JwtAlgorithm::HS256,
        None,
        &json!({"nbf": NOW + 10}),
        &secret,
    );
    assert_eq!(check(&token, &keys, &rules()), Err(Rejection::NotYetValid));
    let lenient = Rules {
        leeway: 10,
        ..rules()
    };
    assert!(check(&token, &keys, &lenient).is_ok());
}

#[test]
fn issuer_audience_and_required_claims_are_checked() {
    let secret = EncodingKey::from_secret(SECRET);
    let keys = [hmac_key(&[JwtAlgorithm::HS256])];
    let strict = Rules {
        issuer: Some("https://id.test".into()),
        audience: vec!["chat".into(), "games".into()],
        leeway: 0,
        require: vec!["sub".into(), "role".into()],
    };
    let token = |claims: Value| sign(JwtAlgorithm::HS256, None, &claims, &secret);
    let good = json!({"iss": "https://id.test", "aud": ["games"], "sub": "a", "role": "x"});
    assert!(check(&token(good), &keys, &strict).is_ok());
    let wrong_aud = json!({"iss": "https://id.test", "aud": "admin", "sub": "a", "role": "x"});
    assert_eq!(
        check(&token(wrong_aud), &keys, &strict),
        Err(Rejection::Audience)
    );
    let no_aud = json!({"iss": "https://id.test", "sub": "a", "role": "x"});
    assert!(check(&token(no_aud), &keys, &strict).is_err());
    let wrong_iss = json!({"iss": "https://evil.test", "aud": "chat", "sub": "a", "role": "x"});
    assert_eq!(
        check(&token(wrong_iss), &keys, &strict),
        Err(Rejection::Issuer)
    );
    let no_role = json!({"iss": "https://id.test", "aud": "chat", "sub": "a"});
    let refused = check(&token(no_role), &keys, &strict).unwrap_err();
    assert_eq!((refused, refused.status()), (Rejection::MissingClaim, 403));
}

#[test]
fn a_jwks_gives_keys_by_kid_and_skips_what_it_cannot_use() {
    let p256 = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let ed = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
    let point = p256.public_key_raw();
    let jwks = json!({"keys": [
        {"kty": "EC", "crv": "P-256", "kid": "ec-1", "alg": "ES256", "use": "sig",
         "x": B64.encode(&point[1..33]), "y": B64.encode(&point[33..65])},
        {"kty": "OKP", "crv": "Ed25519", "kid": "ed-1", "x": B64.encode(ed.public_key_raw())},
        {"kty": "EC", "crv": "P-256", "kid": "enc", "use": "enc", "alg": "ECDH-ES",
         "x": B64.encode(&point[1..33]), "y": B64.encode(&point[33..65])},
        {"kty": "future-kind", "kid": "x"}
    ]});
    let keys = parse_jwks(jwks.to_string().as_bytes(), &[JwtAlgorithm::EdDSA]).unwrap();
    let kids: Vec<_> = keys.iter().map(|k| k.kid.as_deref()).collect();
    assert_eq!(kids, [Some("ec-1"), Some("ed-1")]);
    let ec_signer = EncodingKey::from_ec_pem(p256.serialize_pem().as_bytes()).unwrap();
    let token = sign(JwtAlgorithm::ES256, Some("ec-1"), &claims(), &ec_signer);
    assert!(check(&token, &keys, &rules()).is_ok());
    let ed_signer = EncodingKey::from_ed_pem(ed.serialize_pem().as_bytes()).unwrap();
    let token = sign(JwtAlgorithm::EdDSA, Some("ed-1"), &claims(), &ed_signer);
    assert!(check(&token, &keys, &rules()).is_ok());
    // The Ed25519 key signed, but the token names the EC key.
    let token = sign(JwtAlgorithm::EdDSA, Some("ec-1"), &claims(), &ed_signer);
    assert_eq!(check(&token, &keys, &rules()), Err(Rejection::Algorithm));
    assert!(parse_jwks(br#"{"keys": []}"#, &[]).is_err());
    assert!(parse_jwks(b"[]", &[]).is_err());
}

#[test]
fn claims_that_would_break_a_header_are_not_passed_on() {
    assert_eq!(header_value(&json!("alice")).as_deref(), Some("alice"));
    assert_eq!(header_value(&json!(42)).as_deref(), Some("42"));
    assert_eq!(header_value(&json!("a\r\nX-Admin: 1")), None);
    assert_eq!(header_value(&json!(["a"])), None);
    assert_eq!(header_value(&json!("")), None);
}
