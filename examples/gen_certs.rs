//! Regenerates the development certificates in `certs/`: a CA, a leaf for
//! `localhost` / `127.0.0.1` / `::1` and a leaf for `example.test` / `*.example.test`.
//!
//! For development and tests only; see `certs/README.md`. Run with
//! `cargo run --example gen_certs`.

// A development tool, never deployed: failing loudly on a setup error is its report.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::error::Error;
use std::fs;
use std::path::Path;
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

/// About ten years, so the committed files outlive the project's tests.
const VALIDITY: Duration = Duration::from_secs(3653 * 24 * 3600);
/// Backdated so a machine whose clock is slightly behind still accepts fresh files.
const BACKDATE: Duration = Duration::from_secs(24 * 3600);

fn main() -> Result<(), Box<dyn Error>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("certs");
    fs::create_dir_all(&dir)?;

    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    set_validity(&mut ca_params)?;
    ca_params.distinguished_name = rcgen::DistinguishedName::new();
    ca_params.distinguished_name.push(
        DnType::CommonName,
        "wsgate development CA (NOT FOR PRODUCTION)",
    );
    ca_params
        .distinguished_name
        .push(DnType::OrganizationName, "wsgate tests");
    // Path length 0: this CA signs leaves only, never another CA.
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let ca_pem = ca_cert.pem();
    let issuer = Issuer::new(ca_params, ca_key);

    write(&dir, "ca.crt", &ca_pem)?;
    write(&dir, "ca.key", &issuer.key().serialize_pem())?;

    leaf(
        &dir,
        "localhost",
        &["localhost", "127.0.0.1", "::1"],
        &issuer,
        &ca_pem,
    )?;
    leaf(
        &dir,
        "example-test",
        &["example.test", "*.example.test"],
        &issuer,
        &ca_pem,
    )?;
    Ok(())
}

/// Writes `<stem>.crt` (leaf then CA, the chain a server sends) and `<stem>.key` (PKCS#8).
fn leaf(
    dir: &Path,
    stem: &str,
    names: &[&str],
    issuer: &Issuer<'_, KeyPair>,
    ca_pem: &str,
) -> Result<(), Box<dyn Error>> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(
        names
            .iter()
            .map(|name| (*name).to_owned())
            .collect::<Vec<_>>(),
    )?;
    set_validity(&mut params)?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, names[0]);
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.use_authority_key_identifier_extension = true;
    let cert = params.signed_by(&key, issuer)?;

    write(
        dir,
        &format!("{stem}.crt"),
        &format!("{}{ca_pem}", cert.pem()),
    )?;
    write(dir, &format!("{stem}.key"), &key.serialize_pem())?;
    Ok(())
}

fn set_validity(params: &mut CertificateParams) -> Result<(), Box<dyn Error>> {
    // rcgen's time type is not re-exported; build "now" from the epoch instead of adding
    // the `time` crate just for this.
    let since_epoch = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH)?;
    let now = rcgen::date_time_ymd(1970, 1, 1) + since_epoch;
    params.not_before = now - BACKDATE;
    params.not_after = now + VALIDITY;
    Ok(())
}

fn write(dir: &Path, name: &str, contents: &str) -> Result<(), Box<dyn Error>> {
    let path = dir.join(name);
    fs::write(&path, contents)?;
    println!("wrote {}", path.display());
    Ok(())
}
