//! Mutual TLS and the join token, with real `ballast node` processes and the
//! CLI only:
//! - `ballast cluster certs` makes a CA and certificates (refusing to
//!   overwrite them); three nodes start with TLS and a join token;
//! - `cluster init`, a volume, a seeded image imported and exported byte for
//!   byte through the Data path, all with the client certificate;
//! - a client without TLS, with a certificate from another CA, or mixing
//!   CAs, and a TLS client against a plain node: each fails at once with one
//!   line naming the problem, never a hang;
//! - a fourth TLS node without the join token, or with a wrong one, is
//!   refused ("join token missing or wrong"); with the right one it joins.
//!
//! Seeded: the seed is printed; `BALLAST_SEED=<seed>` replays the run.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::procs::{NodeProc, BIN};
use common::*;

const SHORT: Duration = Duration::from_secs(60);
/// A refusal must come well before any retry deadline (30 s).
const FAST: Duration = Duration::from_secs(10);
const TOKEN: &str = "s3cret-join-token";

/// `ballast cluster certs` into `dir`.
fn certs(dir: &Path) -> Output {
    run(cmd(BIN, ["cluster", "certs", "--hosts", "127.0.0.1,localhost", "--days", "2", "--out"]).arg(dir), SHORT)
}

/// `--tls-ca/--tls-cert/--tls-key` for `who` (`node` or `client`) from `dir`,
/// with the CA of `ca_dir`.
fn tls_args(ca_dir: &Path, dir: &Path, who: &str) -> Vec<String> {
    let p = |f: String| dir.join(f).display().to_string();
    vec![
        "--tls-ca".into(),
        ca_dir.join("ca.crt").display().to_string(),
        "--tls-cert".into(),
        p(format!("{who}.crt")),
        "--tls-key".into(),
        p(format!("{who}.key")),
    ]
}

struct Tls {
    root: tempfile::TempDir,
    nodes: Vec<NodeProc>,
    endpoints: String,
    pki: PathBuf,
}

impl Tls {
    fn client(&self, args: &[&str]) -> Command {
        let mut c = cmd(BIN, args);
        c.args(["--endpoints", &self.endpoints]).args(tls_args(&self.pki, &self.pki, "client"));
        c
    }

    fn ok(&self, args: &[&str]) -> Output {
        let out = run_capture(&mut self.client(args), SHORT);
        assert!(out.status.success(), "{}\n{}", out.describe(), self.logs());
        out
    }

    fn logs(&self) -> String {
        self.nodes.iter().map(|n| format!("--- {} ---\n{}\n", n.addr, n.log_tail(30))).collect()
    }
}

/// Fails with exit code `code`, fast, with one line on stderr containing every one of `needles`.
fn refused(out: &Output, code: i32, needles: &[&str]) {
    assert_eq!(out.status.code(), Some(code), "{}", out.describe());
    assert!(out.elapsed < FAST, "took {:?}: {}", out.elapsed, out.describe());
    let lines: Vec<&str> = out.stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one line expected:\n{}", out.describe());
    eprintln!("[ballast-test] refused in {:.2?} (exit {code}): {}", out.elapsed, lines[0]);
    for n in needles {
        assert!(lines[0].contains(n), "{n:?} missing in {:?}", lines[0]);
    }
}

#[test]
fn a_tls_cluster_serves_its_certificates_and_refuses_everything_else() {
    let seed = seed("tls");
    let root = tempfile::Builder::new().prefix("ballast-tls-").tempdir().expect("tempdir");
    let pki = root.path().join("pki");
    let out = certs(&pki);
    assert!(out.stdout.contains("ca.crt"), "{}", out.describe());
    // A second run must not replace a CA in use.
    let again = run_capture(cmd(BIN, ["cluster", "certs", "--hosts", "127.0.0.1", "--out"]).arg(&pki), SHORT);
    refused(&again, 2, &["refusing to overwrite", "--force"]);
    let other = root.path().join("other-ca");
    certs(&other);

    let mut nodes: Vec<NodeProc> = (1..=3).map(|i| NodeProc::new(root.path(), i)).collect();
    for n in &mut nodes {
        n.extra = tls_args(&pki, &pki, "node");
        n.extra.extend(["--join-token".to_string(), TOKEN.to_string()]);
        n.start();
    }
    let endpoints = nodes.iter().map(|n| n.addr.clone()).collect::<Vec<_>>().join(",");
    let c = Tls { nodes, endpoints, pki, root };

    c.ok(&["cluster", "init", "--replicas", "3", "--shards", "4"]);
    c.ok(&["volume", "create", "v1", "--size", "16MiB"]);
    let image = c.root.path().join("image.raw");
    let data = random_bytes(seed, 6 << 20);
    std::fs::write(&image, &data).expect("image");
    let img = image.display().to_string();
    c.ok(&["volume", "import", "v1", &img, "--no-progress"]);
    let back = c.root.path().join("back.raw");
    c.ok(&["volume", "export", "v1", &back.display().to_string(), "--no-progress"]);
    let got = std::fs::read(&back).expect("exported");
    assert_same_bytes("exported over TLS", &data, &got[..data.len()]);

    // A client without TLS: the nodes close the plain connection.
    let plain = run_capture(&mut cmd(BIN, ["cluster", "status", "--endpoints", &c.endpoints]), SHORT);
    refused(&plain, 1, &["cannot talk to", "requires TLS"]);

    // A client whose CA and certificate are another cluster's: our nodes'
    // certificate is signed by an authority it does not know.
    let mut foreign = cmd(BIN, ["cluster", "status", "--endpoints", &c.endpoints]);
    foreign.args(tls_args(&other, &other, "client"));
    refused(&run_capture(&mut foreign, SHORT), 1, &["TLS handshake with", "certificate signed by unknown authority"]);

    // Our CA but another CA's client certificate: refused before anything is sent.
    let mut mixed = cmd(BIN, ["cluster", "status", "--endpoints", &c.endpoints]);
    mixed.args(tls_args(&c.pki, &other, "client"));
    refused(&run_capture(&mut mixed, SHORT), 2, &["client.crt", "unknown authority"]);

    // Only some of the three files.
    let mut partial = cmd(BIN, ["cluster", "status", "--endpoints", &c.endpoints]);
    partial.args(["--tls-ca", &c.pki.join("ca.crt").display().to_string()]);
    refused(&run_capture(&mut partial, SHORT), 2, &["missing: --tls-cert, --tls-key"]);

    // A TLS client against a node that does not speak TLS.
    let mut bare = NodeProc::new(c.root.path(), 9);
    bare.start();
    let mut to_plain = cmd(BIN, ["cluster", "status", "--endpoints", &bare.addr]);
    to_plain.args(tls_args(&c.pki, &c.pki, "client"));
    let out = run_capture(&mut to_plain, SHORT);
    refused(&out, 1, &["TLS handshake with", "does not speak TLS"]);
    bare.kill9();

    // A fourth node: without the token, then with a wrong one, then the right one.
    let mut n4 = NodeProc::new(c.root.path(), 4);
    let joiner = |token: Option<&str>| {
        let mut a = tls_args(&c.pki, &c.pki, "node");
        a.extend(["--join".to_string(), c.endpoints.clone()]);
        if let Some(t) = token {
            a.extend(["--join-token".to_string(), t.to_string()]);
        }
        a
    };
    for token in [None, Some("wrong-token")] {
        n4.extra = joiner(token);
        n4.start();
        wait_until("the join to be refused", SHORT, || n4.log_tail(50).contains("join token missing or wrong"));
        n4.kill9();
        std::fs::write(&n4.log, "").expect("truncate log");
        let status = c.ok(&["cluster", "status"]);
        assert!(!status.stdout.contains(&n4.addr), "refused node listed:\n{}", status.stdout);
    }
    n4.extra = joiner(Some(TOKEN));
    n4.start();
    wait_until("node 4 to join", SHORT, || {
        let out = run_capture(&mut c.client(&["cluster", "status"]), SHORT);
        out.status.success() && out.stdout.contains(&n4.addr)
    });
}

#[test]
fn bad_tls_and_token_settings_get_one_line_and_exit_2() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data").display().to_string();
    let node = |extra: &[&str], env: &[(&str, &str)]| {
        let mut c = cmd(BIN, ["node", "--data-dir", &data, "--listen", "127.0.0.1:0"]);
        c.args(extra);
        for (k, v) in env {
            c.env(k, v);
        }
        run_capture(&mut c, SHORT)
    };
    refused(&node(&["--tls-ca", "/x/ca.crt"], &[]), 2, &["missing: --tls-cert, --tls-key"]);
    refused(&node(&[], &[("BALLAST_TLS_KEY", "/x/k")]), 2, &["missing: --tls-ca, --tls-cert"]);
    let absent = ["--tls-ca", "/nonexistent/ca.crt", "--tls-cert", "/nonexistent/n.crt", "--tls-key", "/x/n.key"];
    refused(&node(&absent, &[]), 2, &["cannot read CA certificate /nonexistent/ca.crt"]);
    refused(&node(&["--join-token", "has space"], &[]), 2, &["--join-token: invalid join token"]);
    refused(&node(&[], &[("BALLAST_JOIN_TOKEN", "(none)")]), 2, &["BALLAST_JOIN_TOKEN: invalid join token"]);
    let toml = dir.path().join("node.toml");
    std::fs::write(&toml, format!("data_dirs = [\"{data}\"]\ntls_cert = \"/x/n.crt\"\n")).expect("toml");
    let out = run_capture(cmd(BIN, ["node", "--config"]).arg(&toml), SHORT);
    refused(&out, 2, &["missing: --tls-ca, --tls-key"]);

    let bad_host = run_capture(&mut cmd(BIN, ["cluster", "certs", "--out", &data, "--hosts", "node1:7100"]), SHORT);
    refused(&bad_host, 2, &["node1:7100"]);
    let help = run(&mut cmd(BIN, ["cluster", "certs", "--help"]), SHORT);
    assert!(help.stdout.contains("--hosts") && help.stdout.contains("--force"), "{}", help.stdout);
    let status = run(&mut cmd(BIN, ["cluster", "status", "--help"]), SHORT);
    assert!(status.stdout.contains("--tls-ca") && status.stdout.contains("BALLAST_TLS_CERT"), "{}", status.stdout);
}
