//! `ballast demo` as a user runs it: a separate process that serves the
//! volume, survives a clean stop and a `kill -9` with FUA-acknowledged data
//! intact, and answers bad arguments with one readable line.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{cmd, free_port, require_tool, run, run_capture, wait_until};

fn start_demo(data: &Path, port: u16) -> Child {
    let child = Command::new(env!("CARGO_BIN_EXE_ballast"))
        .args(["demo", "--size", "256MiB", "--listen", &format!("127.0.0.1:{port}")])
        .arg("--data-dir")
        .arg(data)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn ballast demo");
    let uri = format!("nbd://127.0.0.1:{port}/demo");
    wait_until("ballast demo to answer", Duration::from_secs(30), || {
        Command::new("nbdinfo").arg("--size").arg(&uri).output().map(|o| o.status.success()).unwrap_or(false)
    });
    child
}

fn stop(mut child: Child, signal: &str) {
    let pid = child.id().to_string();
    let _ = Command::new("kill").args([signal, &pid]).status();
    let status = child.wait().expect("wait for ballast demo");
    if signal == "-INT" {
        assert!(status.success(), "ballast demo must exit cleanly on Ctrl-C, got {status}");
    }
}

#[test]
fn demo_serves_the_same_data_after_a_clean_stop_and_after_kill_9() {
    require_tool("nbdinfo", "libnbd-bin");
    require_tool("qemu-io", "qemu-utils");
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let port = free_port();
    let uri = format!("nbd://127.0.0.1:{port}/demo");

    let demo = start_demo(&data, port);
    let size = run(&mut cmd("nbdinfo", ["--size", &uri]), Duration::from_secs(20));
    assert_eq!(size.stdout.trim(), (256u64 << 20).to_string(), "a new volume gets --size");
    // qemu-io sends FUA on every write: acknowledged means fsync'd.
    run(
        &mut cmd("qemu-io", ["-f", "raw", "-c", "write -P 0x5a 0 1M", "-c", "write -P 0xa5 100M 4k", &uri]),
        Duration::from_secs(60),
    );
    stop(demo, "-INT");

    let demo = start_demo(&data, port);
    run(
        &mut cmd(
            "qemu-io",
            ["-f", "raw", "-c", "read -P 0x5a 0 1M", "-c", "read -P 0xa5 100M 4k", "-c", "write -P 0x77 1M 64k", &uri],
        ),
        Duration::from_secs(60),
    );
    stop(demo, "-KILL");

    let demo = start_demo(&data, port);
    let out = run(
        &mut cmd(
            "qemu-io",
            ["-f", "raw", "-c", "read -P 0x5a 0 1M", "-c", "read -P 0x77 1M 64k", "-c", "read -P 0 2M 1M", &uri],
        ),
        Duration::from_secs(60),
    );
    assert!(!out.stdout.contains("Pattern verification failed"), "{}", out.stdout);
    stop(demo, "-INT");
}

#[test]
fn bad_arguments_get_one_readable_line_and_no_panic() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cases: &[&[&str]] = &[
        &["demo", "--size", "3parsecs"],
        &["demo", "--bogus"],
        &["demo", "--listen", "not-an-address"],
        &["demo", "--volume", "bad/name", "--data-dir", "DIR"],
        &["no-such-command"],
    ];
    for args in cases {
        let args: Vec<String> = args.iter().map(|a| a.replace("DIR", &dir.path().display().to_string())).collect();
        let out = run_capture(Command::new(env!("CARGO_BIN_EXE_ballast")).args(&args), Duration::from_secs(20));
        let stderr = out.stderr.trim();
        assert!(!out.status.success(), "{args:?} must fail");
        assert_eq!(stderr.lines().count(), 1, "{args:?}: one line expected, got:\n{stderr}");
        assert!(stderr.starts_with("ballast: "), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked") && !stderr.contains("RUST_BACKTRACE"), "{args:?}: {stderr}");
    }
}
