//! The `ballast` binary refuses bad arguments, environment and config files
//! with exactly one line on stderr and exit code 2, never a panic, before it
//! starts anything; and every command's `--help` works. No cluster is needed.

use std::io::Read;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const TIMEOUT: Duration = Duration::from_secs(20);

/// Run the binary with a clean `BALLAST_*` environment plus `env`.
fn ballast(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ballast"));
    cmd.args(args).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    for (k, _) in std::env::vars() {
        if k.starts_with("BALLAST_") || k == "RUST_LOG" {
            cmd.env_remove(k);
        }
    }
    cmd.envs(env.iter().copied());
    let mut child = cmd.spawn().expect("spawn ballast");
    let start = Instant::now();
    loop {
        if child.try_wait().expect("wait for ballast").is_some() {
            break;
        }
        if start.elapsed() > TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            panic!("ballast {args:?} did not exit within {TIMEOUT:?}: it should have refused its arguments");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let status = child.wait().expect("wait for ballast");
    let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
    child.stdout.take().expect("stdout").read_to_end(&mut stdout).expect("read stdout");
    child.stderr.take().expect("stderr").read_to_end(&mut stderr).expect("read stderr");
    Output { status, stdout, stderr }
}

fn assert_usage_error(args: &[&str], env: &[(&str, &str)], expect: &str) {
    let out = ballast(args, env);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stderr = stderr.trim_end();
    assert_eq!(out.status.code(), Some(2), "{args:?} {env:?}: exit code 2 expected; stderr:\n{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{args:?} {env:?}: one stderr line expected, got:\n{stderr}");
    assert!(stderr.starts_with("ballast: "), "{args:?} {env:?}: {stderr}");
    assert!(!stderr.contains("panicked") && !stderr.contains("RUST_BACKTRACE"), "{args:?}: {stderr}");
    assert!(stderr.contains(expect), "{args:?} {env:?}: expected {expect:?} in: {stderr}");
    assert!(out.stdout.is_empty(), "{args:?}: nothing on stdout, got {:?}", String::from_utf8_lossy(&out.stdout));
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write config file");
    path.display().to_string()
}

#[test]
fn bad_flags_get_one_line_and_exit_2() {
    let cases: &[(&[&str], &str)] = &[
        (&["no-such-command"], "no-such-command"),
        (&["node", "--bogus"], "--bogus"),
        (&["node", "--data-dir", "/tmp/x", "--listen", "not-an-address"], "not-an-address"),
        (&["node", "--data-dir", "/tmp/x", "--advertise", "no-port"], "no-port"),
        (&["node", "--data-dir", "/tmp/x", "--join", "a:1,nohost"], "nohost"),
        (&["node", "--data-dir", "/tmp/x", "--zone", "bad zone"], "bad zone"),
        (&["node", "--data-dir", "/tmp/x", "--metrics", "9100"], "9100"),
        (&["node", "--data-dir", "/tmp/x", "--down-after", "soon"], "soon"),
        (&["node", "--data-dir", "/tmp/x", "--down-after", "10ms"], "at least 1s"),
        (&["cluster", "drain", "nodeX"], "nodeX"),
        (&["cluster", "remove", "0"], "0"),
        (&["node", "drain", "nodeX"], "nodeX"),
        (&["node", "remove", "0"], "0"),
        (&["node", "drain", "3", "--data-dir", "/tmp/x"], "--data-dir"),
        (&["cluster", "wait-healthy", "--timeout", "5x"], "5x"),
        (&["volume", "create", "v", "--size", "3parsecs"], "3parsecs"),
        (&["volume", "create", "v", "--size", "1000"], "1000"),
        (&["volume", "create", "v", "--size", "0"], "size"),
        (&["volume", "create", "bad/name", "--size", "1GiB"], "bad/name"),
        (&["volume", "resize", "v", "--size", "lots"], "lots"),
        (&["volume", "info"], "NAME"),
        (&["volume", "list", "--output", "yaml"], "yaml"),
        (&["cluster", "status", "--endpoints", "nope"], "nope"),
        (&["cluster", "init", "--replicas", "9"], "9"),
        (&["pool", "create", "p", "--replicas", "3"], "--shards"),
        (&["pool", "create", "p", "--replicas", "3", "--shards", "8", "--failure-domain", "rack"], "rack"),
        (&["attach"], "VOLUME"),
        (&["attach", "v", "--listen", "localhost"], "localhost"),
        (&["attach", "v", "--read-only", "--force"], "--force"),
        (&["gateway", "--socket"], "--socket"),
        (&["demo", "--size", "3parsecs"], "3parsecs"),
        (&["demo", "--base-port", "70000"], "70000"),
        (&["demo", "--volume", "bad/name"], "bad/name"),
        (&["demo", "--listen", "not-an-address"], "not-an-address"),
        (&["node", "--data-dir", "/tmp/x", "--worker-threads", "0"], "--worker-threads"),
        (&["attach", "v", "--worker-threads", "many"], "many"),
    ];
    for (args, expect) in cases {
        assert_usage_error(args, &[], expect);
    }
}

#[test]
fn bad_environment_gets_one_line_and_exit_2() {
    assert_usage_error(&["node", "--data-dir", "/tmp/x"], &[("BALLAST_LISTEN", "nope")], "BALLAST_LISTEN");
    assert_usage_error(&["node", "--data-dir", "/tmp/x"], &[("BALLAST_METRICS", "x:y")], "BALLAST_METRICS");
    assert_usage_error(&["node", "--data-dir", "/tmp/x"], &[("BALLAST_JOIN", "a:1,b")], "BALLAST_JOIN");
    assert_usage_error(&["node", "--data-dir", "/tmp/x"], &[("BALLAST_DOWN_AFTER", "x")], "BALLAST_DOWN_AFTER");
    assert_usage_error(&["node"], &[("BALLAST_ZONE", "a/b"), ("BALLAST_DATA_DIR", "/tmp/x")], "BALLAST_ZONE");
    assert_usage_error(&["volume", "list"], &[("BALLAST_ENDPOINTS", "127.0.0.1:1,bad")], "bad");
    assert_usage_error(&["node"], &[], "no data directory");
    assert_usage_error(&["status"], &[("BALLAST_WORKER_THREADS", "0")], "worker-threads");
}

#[test]
fn bad_config_files_get_one_line_and_exit_2() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let missing = d.join("missing.toml").display().to_string();
    assert_usage_error(&["node", "--config", &missing], &[], "cannot read config file");
    let syntax = write(d, "syntax.toml", "data_dirs = [\"/tmp/x\"\nlisten = \n");
    assert_usage_error(&["node", "--config", &syntax], &[], "syntax.toml line");
    let unknown = write(d, "unknown.toml", "data_dirs = [\"/tmp/x\"]\nlisen = \"0.0.0.0:7100\"\n");
    assert_usage_error(&["node", "--config", &unknown], &[], "unknown field `lisen`");
    let bad_addr = write(d, "addr.toml", "data_dirs = [\"/tmp/x\"]\nlisten = \"everywhere\"\n");
    assert_usage_error(&["node", "--config", &bad_addr], &[], "config key listen");
    let bad_type = write(d, "type.toml", "data_dirs = \"/tmp/x\"\n");
    assert_usage_error(&["node", "--config", &bad_type], &[], "type.toml line 1");
    let no_dirs = write(d, "nodirs.toml", "listen = \"127.0.0.1:7100\"\n");
    assert_usage_error(&["node", "--config", &no_dirs], &[], "no data directory");
    // The file is also found through the environment.
    assert_usage_error(&["node"], &[("BALLAST_CONFIG", &unknown)], "unknown field");
    // A flag overrides the file's bad value, so the next problem is the one reported.
    assert_usage_error(
        &["node", "--config", &bad_addr, "--listen", "127.0.0.1:7100", "--metrics", "nope"],
        &[],
        "nope",
    );
}

#[test]
fn every_command_has_help() {
    let commands: &[&[&str]] = &[
        &[],
        &["node"],
        &["cluster"],
        &["cluster", "init"],
        &["cluster", "status"],
        &["cluster", "drain"],
        &["cluster", "remove"],
        &["node", "drain"],
        &["node", "remove"],
        &["cluster", "wait-healthy"],
        &["pool"],
        &["pool", "create"],
        &["pool", "list"],
        &["volume"],
        &["volume", "create"],
        &["volume", "list"],
        &["volume", "info"],
        &["volume", "resize"],
        &["volume", "delete"],
        &["attach"],
        &["gateway"],
        &["demo"],
    ];
    for cmd in commands {
        let mut args = cmd.to_vec();
        args.push("--help");
        let out = ballast(&args, &[]);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        assert!(stdout.contains("Usage: ballast"), "{args:?}: {stdout}");
    }
    let node = String::from_utf8_lossy(&ballast(&["node", "--help"], &[]).stdout).to_string();
    assert!(node.contains("BALLAST_DATA_DIR") && node.contains("--config"), "{node}");
    assert!(!node.contains("exit-with-parent"), "the demo's flag stays hidden: {node}");
    let status = String::from_utf8_lossy(&ballast(&["cluster", "status", "--help"], &[]).stdout).to_string();
    assert!(status.contains("--endpoints") && status.contains("BALLAST_ENDPOINTS"), "{status}");
}
