//! The deployment files only use flags the binary has: every `ballast`
//! command line in the compose files and the Kubernetes manifests is found,
//! and each of its flags is looked up in `ballast <subcommand> --help`.
//! No cluster, no Docker, no Kubernetes needed.
//!
//! A command line is a subcommand word (`node`, `gateway`, `cluster init`, …)
//! that follows `ballast`, the init service's `step` helper, or a YAML
//! `command:`/`args:` key; its flags run to the end of the shell command
//! (`&&`, `;`, `|`, …) or the next YAML key. Each file must yield the command
//! lines it is known to hold, so a change the scanner cannot follow fails here
//! instead of checking nothing.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;

/// Every file with `ballast` command lines, and the subcommands it runs.
const FILES: &[(&str, &[&str])] = &[
    ("deploy/compose.yaml", &["node", "node", "node", "cluster init", "volume create", "gateway"]),
    ("deploy/compose.scale5.yaml", &["node", "node"]),
    ("deploy/kubernetes/node-statefulset.yaml", &["node"]),
    ("deploy/kubernetes/bootstrap-job.yaml", &["cluster init"]),
    ("deploy/kubernetes/gateway-daemonset.yaml", &["gateway"]),
];

/// Words that start a command line, and those that take a sub-subcommand.
const COMMANDS: &[&str] = &["node", "gateway", "attach", "demo", "cluster", "pool", "volume"];
const GROUPS: &[&str] = &["cluster", "pool", "volume"];
/// What precedes a command line's first word.
const LEADS: &[&str] = &["ballast", "step", "command:", "args:"];
/// Ends of a shell command.
const ENDS: &[&str] = &["&&", "||", ";", "|", "then", "do", "fi", "done", "esac", ";;"];

#[derive(Debug, PartialEq, Eq)]
struct Invocation {
    /// `node`, `cluster init`, …
    command: String,
    flags: Vec<String>,
    line: usize,
}

/// Drop YAML/shell comments: `#` at the start of a line or after blank space.
fn strip_comment(line: &str) -> &str {
    let bytes = line.as_bytes();
    for (i, &b) in bytes.iter().enumerate() {
        if b == b'#' && (i == 0 || bytes[i - 1].is_ascii_whitespace()) {
            return &line[..i];
        }
    }
    line
}

/// Words with their line numbers: YAML flow and shell punctuation split words,
/// quotes and line continuations go.
fn tokens(text: &str) -> Vec<(String, usize)> {
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = strip_comment(line);
        for word in line.split(|c: char| c.is_whitespace() || "[](),\"'\\{}".contains(c)) {
            let word = word.trim();
            if !word.is_empty() && word != "-" {
                out.push((word.to_string(), n + 1));
            }
        }
    }
    out
}

/// A YAML mapping key such as `volumes:` (values like `node1:7100` are not).
fn is_key(word: &str) -> bool {
    word.strip_suffix(':').is_some_and(|k| {
        k.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
            && k.chars().all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c))
    })
}

/// The flags in a word: `--zone`, also inside `${ZONE:+--zone`.
fn flags_in(word: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = word;
    while let Some(i) = rest.find("--") {
        let name: String = rest[i + 2..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '-').collect();
        if name.chars().next().is_some_and(|c| c.is_ascii_lowercase()) {
            out.push(format!("--{name}"));
        }
        rest = &rest[i + 2 + name.len()..];
    }
    out
}

fn invocations(text: &str) -> Vec<Invocation> {
    let words = tokens(text);
    let mut out = Vec::new();
    let mut i = 0;
    while i < words.len() {
        let (word, line) = &words[i];
        let led = i > 0 && LEADS.contains(&words[i - 1].0.as_str());
        if !(led && COMMANDS.contains(&word.as_str())) {
            i += 1;
            continue;
        }
        let mut command = word.clone();
        i += 1;
        if GROUPS.contains(&word.as_str()) {
            if let Some((sub, _)) = words.get(i) {
                command = format!("{command} {sub}");
                i += 1;
            }
        }
        let mut flags = Vec::new();
        while let Some((w, _)) = words.get(i) {
            if ENDS.contains(&w.as_str()) || is_key(w) {
                break;
            }
            flags.extend(flags_in(w));
            i += 1;
        }
        out.push(Invocation { command, flags, line: *line });
    }
    out
}

/// The long flags `ballast <command> --help` lists.
fn known_flags(command: &str, cache: &mut BTreeMap<String, BTreeSet<String>>) -> BTreeSet<String> {
    if let Some(f) = cache.get(command) {
        return f.clone();
    }
    let out = Command::new(env!("CARGO_BIN_EXE_ballast"))
        .args(command.split(' '))
        .arg("--help")
        .env_remove("BALLAST_ENDPOINTS")
        .output()
        .expect("run ballast --help");
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "ballast {command} --help failed: {}", String::from_utf8_lossy(&out.stderr));
    let flags: BTreeSet<String> = help.split_whitespace().flat_map(flags_in).collect();
    assert!(flags.contains("--help"), "ballast {command} --help lists no flags:\n{help}");
    cache.insert(command.to_string(), flags.clone());
    flags
}

/// `file:line: ballast <command> has no <flag>` for each unknown flag.
fn unknown_flags(file: &str, found: &[Invocation], cache: &mut BTreeMap<String, BTreeSet<String>>) -> Vec<String> {
    let mut bad = Vec::new();
    for inv in found {
        let known = known_flags(&inv.command, cache);
        for f in inv.flags.iter().filter(|f| !known.contains(*f)) {
            bad.push(format!("{file}:{}: `ballast {}` has no {f}", inv.line, inv.command));
        }
    }
    bad
}

#[test]
fn every_flag_in_the_compose_files_and_kubernetes_manifests_exists() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut cache = BTreeMap::new();
    let mut bad = Vec::new();
    for (file, expected) in FILES {
        let text = std::fs::read_to_string(root.join(file)).unwrap_or_else(|e| panic!("read {file}: {e}"));
        let found = invocations(&text);
        let commands: Vec<&str> = found.iter().map(|i| i.command.as_str()).collect();
        assert_eq!(&commands, expected, "{file}: the ballast command lines found");
        for inv in &found {
            assert!(!inv.flags.is_empty(), "{file}:{}: `ballast {}` with no flags found", inv.line, inv.command);
        }
        bad.extend(unknown_flags(file, &found, &mut cache));
    }
    assert!(bad.is_empty(), "flags the binary does not have:\n{}", bad.join("\n"));
}

#[test]
fn the_scanner_finds_command_lines_in_every_form_the_files_use_and_reports_unknown_flags() {
    let text = r#"
# ballast node --in-a-comment
services:
  a:
    command: [node, --data-dir, /data,
              --zone, z1, --no-such-flag, x]
    volumes: [a:/data]
  b:
    command:
      - |
        step cluster init --replicas 3 --shards "$$SHARDS" &&
        step volume create "$$VOLUME" --size "$$SIZE"
  c:
    args:
      - gateway
      - --listen
      - 127.0.0.1:10809
    readinessProbe: {}
  d:
    args:
      - |
        out=$(ballast cluster init --replicas 3 2>&1) && echo "$out"
        exec ballast node --data-dir /data ${ZONE:+--zone "$ZONE"} ${seeds:+--join "$seeds"}
"#;
    let found = invocations(text);
    let summary: Vec<(&str, Vec<&str>)> =
        found.iter().map(|i| (i.command.as_str(), i.flags.iter().map(String::as_str).collect())).collect();
    assert_eq!(
        summary,
        vec![
            ("node", vec!["--data-dir", "--zone", "--no-such-flag"]),
            ("cluster init", vec!["--replicas", "--shards"]),
            ("volume create", vec!["--size"]),
            ("gateway", vec!["--listen"]),
            ("cluster init", vec!["--replicas"]),
            ("node", vec!["--data-dir", "--zone", "--join"]),
        ]
    );
    let bad = unknown_flags("example.yaml", &found, &mut BTreeMap::new());
    assert_eq!(bad, vec!["example.yaml:5: `ballast node` has no --no-such-flag".to_string()]);
}
