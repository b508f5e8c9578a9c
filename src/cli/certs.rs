//! `ballast cluster certs`: a cluster CA and the certificates for mutual TLS.
//!
//! Writes into `--out`:
//!
//! | file | what |
//! | --- | --- |
//! | `ca.crt`, `ca.key` | the cluster CA (keep `ca.key` offline: it signs new certificates) |
//! | `node.crt`, `node.key` | for every node: server *and* client use (nodes call each other); names every `--hosts` entry plus `localhost` and `127.0.0.1` |
//! | `client.crt`, `client.key` | for the CLI, `attach`, `gateway`, the Docker plugin: client use only |
//!
//! Keys are ECDSA P-256, written with mode 0600. Existing files are never
//! overwritten without `--force`, so a second run cannot silently replace a
//! CA that signed certificates in use. Rotation: generate a new set and
//! restart every node and client with it.

use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

use super::UsageError;

/// The files `certs` writes, in order.
pub const FILES: [&str; 6] = ["ca.crt", "ca.key", "node.crt", "node.key", "client.crt", "client.key"];

#[derive(clap::Args)]
pub struct CertsArgs {
    /// Directory to write the files into (created if missing).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Host names and IP addresses the nodes are reached at, comma-separated
    /// (their `--advertise` hosts); localhost and 127.0.0.1 are always added.
    #[arg(long, value_name = "HOST,...", value_delimiter = ',', value_parser = parse_host)]
    pub hosts: Vec<String>,
    /// Validity of every certificate, in days.
    #[arg(long, value_name = "N", default_value_t = 825, value_parser = clap::value_parser!(u32).range(1..=36500))]
    pub days: u32,
    /// Replace files that already exist.
    #[arg(long)]
    pub force: bool,
}

/// A DNS name or an IP address (a `host:port` is refused: certificates name hosts).
fn parse_host(s: &str) -> Result<String, String> {
    let h = s.trim();
    if h.parse::<IpAddr>().is_ok() {
        return Ok(h.to_string());
    }
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    if h.is_empty() || h.len() > 253 || !h.split('.').all(label_ok) {
        return Err(format!("invalid host {s:?}: expected a DNS name or an IP address, without a port"));
    }
    Ok(h.to_ascii_lowercase())
}

/// The PEM texts of one generated set.
pub struct CertSet {
    pub files: Vec<(&'static str, String)>,
}

/// Generate a CA, a node certificate naming `hosts` (plus localhost and
/// 127.0.0.1) and a client certificate, each valid for `days`.
pub fn generate(hosts: &[String], days: u32) -> Result<CertSet> {
    let epoch = rcgen::date_time_ymd(1970, 1, 1);
    let now = SystemTime::now().duration_since(UNIX_EPOCH).context("the clock is before 1970")?.as_secs();
    let window = |p: &mut CertificateParams| {
        // An hour of slack before now, for clocks that lag behind this one.
        p.not_before = epoch + Duration::from_secs(now.saturating_sub(3600));
        p.not_after = epoch + Duration::from_secs(now + u64::from(days) * 86_400);
    };

    let ca_key = KeyPair::generate().context("generating the CA key")?;
    let mut ca = CertificateParams::default();
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    ca.distinguished_name = name("Ballast cluster CA");
    window(&mut ca);
    let ca_cert = ca.self_signed(&ca_key).context("signing the CA certificate")?;
    let issuer = Issuer::new(ca, ca_key);

    let mut sans: Vec<String> = hosts.to_vec();
    for always in ["localhost", "127.0.0.1"] {
        if !sans.iter().any(|h| h == always) {
            sans.push(always.to_string());
        }
    }
    let node_key = KeyPair::generate().context("generating the node key")?;
    let mut node = CertificateParams::default();
    node.subject_alt_names = sans.iter().map(|h| san(h)).collect::<Result<_>>()?;
    node.distinguished_name = name("ballast node");
    node.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
    node.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    window(&mut node);
    let node_cert = node.signed_by(&node_key, &issuer).context("signing the node certificate")?;

    let client_key = KeyPair::generate().context("generating the client key")?;
    let mut client = CertificateParams::default();
    client.distinguished_name = name("ballast client");
    client.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    client.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    window(&mut client);
    let client_cert = client.signed_by(&client_key, &issuer).context("signing the client certificate")?;

    let texts = [
        ca_cert.pem(),
        issuer.key().serialize_pem(),
        node_cert.pem(),
        node_key.serialize_pem(),
        client_cert.pem(),
        client_key.serialize_pem(),
    ];
    Ok(CertSet { files: FILES.into_iter().zip(texts).collect() })
}

fn name(cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    dn
}

fn san(host: &str) -> Result<SanType> {
    Ok(match host.parse::<IpAddr>() {
        Ok(ip) => SanType::IpAddress(ip),
        Err(_) => SanType::DnsName(host.try_into().with_context(|| format!("host {host:?}"))?),
    })
}

/// Write `set` into `dir`: refuses (before writing anything) when a file
/// exists and `force` is off; keys get mode 0600.
pub fn write(dir: &Path, set: &CertSet, force: bool) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    if !force {
        let existing: Vec<&str> = set.files.iter().map(|(n, _)| *n).filter(|n| dir.join(n).exists()).collect();
        if !existing.is_empty() {
            return Err(UsageError(format!(
                "{} already holds {}: refusing to overwrite (use --force to replace them)",
                dir.display(),
                existing.join(", ")
            ))
            .into());
        }
    }
    for (file, text) in &set.files {
        let path = dir.join(file);
        let mode = if file.ends_with(".key") { 0o600 } else { 0o644 };
        // Remove first so a forced overwrite of a key never passes through a wider mode.
        if force {
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e).with_context(|| format!("cannot replace {}", path.display())),
            }
        }
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&path)
            .with_context(|| format!("cannot write {}", path.display()))?;
        f.write_all(text.as_bytes())
            .and_then(|()| f.sync_all())
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
}

pub fn run(args: CertsArgs) -> Result<()> {
    if args.hosts.is_empty() {
        return Err(UsageError("--hosts is empty: name the hosts or IPs the nodes are reached at".into()).into());
    }
    let set = generate(&args.hosts, args.days)?;
    write(&args.out, &set, args.force)?;
    let dir = args.out.display();
    println!("wrote {} to {dir}", FILES.join(", "));
    println!("nodes:   ballast node --tls-ca {dir}/ca.crt --tls-cert {dir}/node.crt --tls-key {dir}/node.key …");
    println!(
        "clients: --tls-ca {dir}/ca.crt --tls-cert {dir}/client.crt --tls-key {dir}/client.key (or BALLAST_TLS_*)"
    );
    println!("keep {dir}/ca.key offline: it signs new certificates");
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn hosts_are_names_or_ips_without_ports() {
        assert_eq!(parse_host("Node-1.example"), Ok("node-1.example".into()));
        assert_eq!(parse_host("10.0.0.5"), Ok("10.0.0.5".into()));
        assert_eq!(parse_host("::1"), Ok("::1".into()));
        for bad in ["", "node-1:7100", "a b", "-x", "x..y"] {
            assert!(parse_host(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_generated_set_loads_as_tls_and_keys_are_private() {
        let dir = tempfile::tempdir().expect("tempdir");
        let set = generate(&["node-1".into(), "10.1.2.3".into()], 30).expect("generate");
        write(dir.path(), &set, false).expect("write");
        for f in FILES {
            let mode = std::fs::metadata(dir.path().join(f)).expect("file").permissions().mode() & 0o777;
            assert_eq!(mode, if f.ends_with(".key") { 0o600 } else { 0o644 }, "{f}");
        }
        let files = |cert: &str, key: &str| ballast_client::TlsFiles {
            ca: dir.path().join("ca.crt"),
            cert: dir.path().join(cert),
            key: dir.path().join(key),
        };
        files("node.crt", "node.key").load().expect("node set loads");
        files("client.crt", "client.key").load().expect("client set loads");
        assert!(files("client.crt", "node.key").load().is_err(), "mismatched key refused");

        let err = write(dir.path(), &set, false).expect_err("exists");
        assert!(err.downcast_ref::<UsageError>().is_some());
        assert!(err.to_string().contains("--force"), "{err}");
        let before = std::fs::read(dir.path().join("ca.crt")).expect("ca");
        let again = generate(&["node-1".into()], 30).expect("generate");
        write(dir.path(), &again, true).expect("forced");
        assert_ne!(std::fs::read(dir.path().join("ca.crt")).expect("ca"), before);
        let mode = std::fs::metadata(dir.path().join("ca.key")).expect("key").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }
}
