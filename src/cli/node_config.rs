//! `ballast node`'s settings from three layers — flags, `BALLAST_*`
//! environment variables, a TOML file — merged by [`merge`] with the
//! precedence flag > env > file > default. Everything here is pure (the
//! environment is passed in as a lookup function) so the precedence and the
//! error messages are unit-tested without processes.
//!
//! The TOML file has the same keys as the flags:
//!
//! ```toml
//! data_dirs = ["/var/lib/ballast/disk1", "/var/lib/ballast/disk2"]
//! listen = "0.0.0.0:7100"
//! advertise = "10.0.0.5:7100"
//! zone = "rack-a"
//! metrics = "0.0.0.0:9100"
//! join = ["10.0.0.1:7100", "10.0.0.2:7100"]
//! down_after = "60s"
//! rebuild_rate = "200MiB"   # per second, all rebuild streams this node sends
//! scrub_rate = "8MiB"       # per second, reading blocks to verify their CRC32C
//! scrub_interval = "24h"    # between the end of a scrub pass and the next
//! tls_ca = "/etc/ballast/ca.crt"      # the three TLS keys go together
//! tls_cert = "/etc/ballast/node.crt"
//! tls_key = "/etc/ballast/node.key"
//! join_token = "…"                    # joins must present the same token
//! ```
//!
//! Unknown keys are refused, so a misspelt key never silently falls back to
//! a default.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ballast_client::TlsFiles;
use ballast_types::{validate_addr, validate_name};
use serde::Deserialize;

/// Where the node listens when no layer says.
pub const DEFAULT_LISTEN: &str = "0.0.0.0:7100";

/// The environment variables read, one per setting.
pub const ENV_DATA_DIR: &str = "BALLAST_DATA_DIR";
pub const ENV_LISTEN: &str = "BALLAST_LISTEN";
pub const ENV_ADVERTISE: &str = "BALLAST_ADVERTISE";
pub const ENV_ZONE: &str = "BALLAST_ZONE";
pub const ENV_METRICS: &str = "BALLAST_METRICS";
pub const ENV_JOIN: &str = "BALLAST_JOIN";
pub const ENV_DOWN_AFTER: &str = "BALLAST_DOWN_AFTER";
pub const ENV_REBUILD_RATE: &str = "BALLAST_REBUILD_RATE";
/// Shared with the client commands (`--tls-ca` …), which read the same variables.
pub const ENV_TLS_CA: &str = "BALLAST_TLS_CA";
pub const ENV_TLS_CERT: &str = "BALLAST_TLS_CERT";
pub const ENV_TLS_KEY: &str = "BALLAST_TLS_KEY";
pub const ENV_JOIN_TOKEN: &str = "BALLAST_JOIN_TOKEN";
pub const ENV_SCRUB_RATE: &str = "BALLAST_SCRUB_RATE";
pub const ENV_SCRUB_INTERVAL: &str = "BALLAST_SCRUB_INTERVAL";
/// Every variable that configures a node (the demo clears them for its children).
pub const ENV_ALL: [&str; 14] = [
    ENV_DATA_DIR,
    ENV_LISTEN,
    ENV_ADVERTISE,
    ENV_ZONE,
    ENV_METRICS,
    ENV_JOIN,
    ENV_DOWN_AFTER,
    ENV_REBUILD_RATE,
    ENV_TLS_CA,
    ENV_TLS_CERT,
    ENV_TLS_KEY,
    ENV_JOIN_TOKEN,
    ENV_SCRUB_RATE,
    ENV_SCRUB_INTERVAL,
];
/// Bytes per second scrub reads at when no layer says.
pub const DEFAULT_SCRUB_RATE: u64 = 8 << 20;
/// Time between scrub passes when no layer says.
pub const DEFAULT_SCRUB_INTERVAL: Duration = Duration::from_secs(24 * 3600);
/// Longest join token accepted (the wire's limit).
pub const MAX_JOIN_TOKEN_LEN: usize = 1024;
/// How long a silent node stays a voter before its replicas are rebuilt elsewhere.
pub const DEFAULT_DOWN_AFTER: Duration = Duration::from_secs(60);

/// One layer of settings, unvalidated. `None` (or an empty list) means
/// "not set here": the next layer decides.
#[derive(Debug, Default, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Layer {
    pub data_dirs: Option<Vec<PathBuf>>,
    pub listen: Option<String>,
    pub advertise: Option<String>,
    pub zone: Option<String>,
    pub metrics: Option<String>,
    pub join: Option<Vec<String>>,
    pub down_after: Option<String>,
    pub rebuild_rate: Option<String>,
    pub tls_ca: Option<PathBuf>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub join_token: Option<String>,
    pub scrub_rate: Option<String>,
    pub scrub_interval: Option<String>,
}

/// The merged, validated settings a node starts with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeSettings {
    pub data_dirs: Vec<PathBuf>,
    pub listen: SocketAddr,
    /// The address peers and clients use; empty = the node derives it.
    pub advertise: String,
    pub zone: Option<String>,
    pub metrics: Option<SocketAddr>,
    /// Endpoints to join through; empty = wait for `ballast cluster init`.
    pub join: Vec<String>,
    /// When this node leads the meta group: how long another node may stay
    /// silent before it is marked down and its replicas are rebuilt.
    pub down_after: Duration,
    /// Bytes per second for the rebuild (snapshot) streams this node sends;
    /// `None`: unlimited.
    pub rebuild_rate: Option<u64>,
    /// Mutual TLS files (all three, or none: plain HTTP/2). Read when the
    /// node starts, not here.
    pub tls: Option<TlsFiles>,
    /// Joins (and `cluster init`) must present this token; `None`: no check.
    pub join_token: Option<String>,
    /// Bytes per second scrub reads at; `None`: unlimited.
    pub scrub_rate: Option<u64>,
    /// Between the end of one scrub pass and the start of the next.
    pub scrub_interval: Duration,
}

/// The layer the environment describes; `get` is `std::env::var(..).ok()`
/// in the binary. Empty variables count as unset; lists are comma-separated.
pub fn env_layer(get: impl Fn(&str) -> Option<String>) -> Layer {
    let get = |k: &str| get(k).map(|v| v.trim().to_string()).filter(|v| !v.is_empty());
    Layer {
        data_dirs: get(ENV_DATA_DIR).map(|v| split_list(&v).into_iter().map(PathBuf::from).collect()),
        listen: get(ENV_LISTEN),
        advertise: get(ENV_ADVERTISE),
        zone: get(ENV_ZONE),
        metrics: get(ENV_METRICS),
        join: get(ENV_JOIN).map(|v| split_list(&v)),
        down_after: get(ENV_DOWN_AFTER),
        rebuild_rate: get(ENV_REBUILD_RATE),
        tls_ca: get(ENV_TLS_CA).map(PathBuf::from),
        tls_cert: get(ENV_TLS_CERT).map(PathBuf::from),
        tls_key: get(ENV_TLS_KEY).map(PathBuf::from),
        join_token: get(ENV_JOIN_TOKEN),
        scrub_rate: get(ENV_SCRUB_RATE),
        scrub_interval: get(ENV_SCRUB_INTERVAL),
    }
}

fn split_list(v: &str) -> Vec<String> {
    v.split(',').map(str::trim).filter(|s| !s.is_empty()).map(str::to_string).collect()
}

/// Parse the TOML text of the config file at `path` (named in errors).
pub fn parse_file(path: &Path, text: &str) -> Result<Layer, String> {
    toml::from_str(text).map_err(|e| {
        let at = e.span().map(|s| format!(" line {}", line_of(text, s.start))).unwrap_or_default();
        format!("config file {}{at}: {}", path.display(), e.message().trim())
    })
}

fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes().iter().take(offset).filter(|&&b| b == b'\n').count() + 1
}

/// Read and parse the config file.
pub fn load_file(path: &Path) -> Result<Layer, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read config file {}: {e}", path.display()))?;
    parse_file(path, &text)
}

/// Merge the layers (flag > env > file > default) and validate the result.
/// Errors name the layer the bad value came from.
pub fn merge(flags: &Layer, env: &Layer, file: &Layer) -> Result<NodeSettings, String> {
    let layers = [(Origin::Flag, flags), (Origin::Env, env), (Origin::File, file)];
    let first = |pick: fn(&Layer) -> Option<&String>| layers.iter().find_map(|(o, l)| pick(l).map(|v| (*o, v)));
    let first_list = |pick: fn(&Layer) -> Option<&Vec<String>>| {
        layers.iter().find_map(|(o, l)| pick(l).filter(|v| !v.is_empty()).map(|v| (*o, v)))
    };

    let data_dirs = layers
        .iter()
        .find_map(|(_, l)| l.data_dirs.as_ref().filter(|d| !d.is_empty()))
        .cloned()
        .ok_or_else(|| {
            format!("no data directory: give --data-dir DIR (repeatable), {ENV_DATA_DIR}=DIR[,DIR] or data_dirs in --config")
        })?;
    if let Some(d) = data_dirs.iter().find(|d| d.as_os_str().is_empty()) {
        return Err(format!("empty data directory in {d:?}"));
    }

    let listen = match first(|l| l.listen.as_ref()) {
        Some((o, v)) => socket_addr(v, o.name("listen", "--listen", ENV_LISTEN))?,
        None => DEFAULT_LISTEN.parse().map_err(|_| "internal: bad default listen address".to_string())?,
    };
    let metrics = first(|l| l.metrics.as_ref())
        .map(|(o, v)| socket_addr(v, o.name("metrics", "--metrics", ENV_METRICS)))
        .transpose()?;
    let advertise = match first(|l| l.advertise.as_ref()) {
        Some((o, v)) => {
            validate_addr(v).map_err(|e| format!("{}: {e}", o.name("advertise", "--advertise", ENV_ADVERTISE)))?;
            v.clone()
        }
        None => String::new(),
    };
    let zone = first(|l| l.zone.as_ref())
        .map(|(o, v)| {
            validate_name(v).map_err(|e| format!("{}: zone {v:?}: {e}", o.name("zone", "--zone", ENV_ZONE)))?;
            Ok::<_, String>(v.clone())
        })
        .transpose()?;
    let join = match first_list(|l| l.join.as_ref()) {
        Some((o, v)) => {
            for a in v {
                validate_addr(a).map_err(|e| format!("{}: {e}", o.name("join", "--join", ENV_JOIN)))?;
            }
            v.clone()
        }
        None => Vec::new(),
    };
    let down_after = match first(|l| l.down_after.as_ref()) {
        Some((o, v)) => {
            parse_duration(v).map_err(|e| format!("{}: {e}", o.name("down_after", "--down-after", ENV_DOWN_AFTER)))?
        }
        None => DEFAULT_DOWN_AFTER,
    };
    let rebuild_rate = match first(|l| l.rebuild_rate.as_ref()) {
        Some((o, v)) => {
            parse_rate(v).map_err(|e| format!("{}: {e}", o.name("rebuild_rate", "--rebuild-rate", ENV_REBUILD_RATE)))?
        }
        None => None,
    };
    let path = |pick: fn(&Layer) -> Option<&PathBuf>| layers.iter().find_map(|(_, l)| pick(l).cloned());
    let tls =
        TlsFiles::from_parts(path(|l| l.tls_ca.as_ref()), path(|l| l.tls_cert.as_ref()), path(|l| l.tls_key.as_ref()))
            .map_err(|e| match e {
                ballast_client::TlsError::Incomplete { missing } => incomplete_tls(&missing),
                other => other.to_string(),
            })?;
    let join_token = first(|l| l.join_token.as_ref())
        .map(|(o, v)| {
            validate_join_token(v)
                .map_err(|e| format!("{}: {e}", o.name("join_token", "--join-token", ENV_JOIN_TOKEN)))?;
            Ok::<_, String>(v.clone())
        })
        .transpose()?;
    let scrub_rate = match first(|l| l.scrub_rate.as_ref()) {
        Some((o, v)) => {
            parse_rate(v).map_err(|e| format!("{}: {e}", o.name("scrub_rate", "--scrub-rate", ENV_SCRUB_RATE)))?
        }
        None => Some(DEFAULT_SCRUB_RATE),
    };
    let scrub_interval = match first(|l| l.scrub_interval.as_ref()) {
        Some((o, v)) => parse_duration(v)
            .map_err(|e| format!("{}: {e}", o.name("scrub_interval", "--scrub-interval", ENV_SCRUB_INTERVAL)))?,
        None => DEFAULT_SCRUB_INTERVAL,
    };
    Ok(NodeSettings {
        data_dirs,
        listen,
        advertise,
        zone,
        metrics,
        join,
        down_after,
        rebuild_rate,
        tls,
        join_token,
        scrub_rate,
        scrub_interval,
    })
}

/// The one line for a TLS setting given without the other two (`missing`
/// names `ca`, `cert`, `key`); node and client commands say the same.
pub fn incomplete_tls(missing: &[&str]) -> String {
    let names: Vec<String> = missing.iter().map(|m| format!("--tls-{m}")).collect();
    format!(
        "TLS needs --tls-ca, --tls-cert and --tls-key together ({ENV_TLS_CA}/CERT/KEY, or tls_ca/tls_cert/tls_key \
         in --config); missing: {}",
        names.join(", ")
    )
}

/// A join token: 1-1024 characters of `A-Z a-z 0-9 . _ ~ + / = -` (what
/// `openssl rand -base64 32` or `-hex 32` prints), so it survives shells,
/// environment files and TOML unquoted mistakes alike.
pub fn validate_join_token(v: &str) -> Result<(), String> {
    let ok = |c: char| c.is_ascii_alphanumeric() || "._~+/=-".contains(c);
    if v.is_empty() || v.len() > MAX_JOIN_TOKEN_LEN || !v.chars().all(ok) {
        return Err(format!(
            "invalid join token: expected 1-{MAX_JOIN_TOKEN_LEN} characters of A-Z a-z 0-9 . _ ~ + / = -"
        ));
    }
    Ok(())
}

/// A rate in bytes per second as a size (`200MiB`, `1GiB`); `0` or
/// `unlimited`: no limit (`None`).
pub fn parse_rate(v: &str) -> Result<Option<u64>, String> {
    let t = v.trim();
    if t == "unlimited" {
        return Ok(None);
    }
    let bytes = ballast_types::parse_size(t).map_err(|e| format!("invalid rate {v:?}: {e}"))?;
    Ok((bytes > 0).then_some(bytes))
}

/// A duration as `500ms`, `30s`, `5m` or `1h` (a bare number is seconds);
/// at least one second.
pub fn parse_duration(v: &str) -> Result<Duration, String> {
    let t = v.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let bad = || format!("invalid duration {v:?}: expected a number with ms, s, m or h, e.g. 60s");
    let n: u64 = num.parse().map_err(|_| bad())?;
    let d = match unit.trim() {
        "ms" => Duration::from_millis(n),
        "" | "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n.saturating_mul(60)),
        "h" => Duration::from_secs(n.saturating_mul(3600)),
        _ => return Err(bad()),
    };
    if d < Duration::from_secs(1) {
        return Err(format!("invalid duration {v:?}: at least 1s"));
    }
    Ok(d)
}

fn socket_addr(v: &str, origin: String) -> Result<SocketAddr, String> {
    v.parse().map_err(|_| format!("{origin}: invalid address {v:?}: expected IP:PORT, e.g. 0.0.0.0:7100"))
}

#[derive(Debug, Clone, Copy)]
enum Origin {
    Flag,
    Env,
    File,
}

impl Origin {
    fn name(self, key: &str, flag: &str, env: &str) -> String {
        match self {
            Origin::Flag => flag.to_string(),
            Origin::Env => env.to_string(),
            Origin::File => format!("config key {key}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(vars: &[(&str, &str)]) -> Layer {
        let map: HashMap<String, String> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        env_layer(|k| map.get(k).cloned())
    }

    fn layer(listen: &str, zone: &str, dir: &str) -> Layer {
        Layer {
            listen: Some(listen.into()),
            zone: Some(zone.into()),
            data_dirs: Some(vec![dir.into()]),
            ..Layer::default()
        }
    }

    #[test]
    fn a_flag_beats_the_environment_which_beats_the_file_which_beats_the_default() {
        let flags = layer("127.0.0.1:1", "flag", "/flag");
        let env = layer("127.0.0.1:2", "env", "/env");
        let file = layer("127.0.0.1:3", "file", "/file");
        let none = Layer::default();

        let s = merge(&flags, &env, &file).unwrap();
        assert_eq!((s.listen.port(), s.zone.as_deref(), s.data_dirs[0].to_str()), (1, Some("flag"), Some("/flag")));
        let s = merge(&none, &env, &file).unwrap();
        assert_eq!((s.listen.port(), s.zone.as_deref(), s.data_dirs[0].to_str()), (2, Some("env"), Some("/env")));
        let s = merge(&none, &none, &file).unwrap();
        assert_eq!((s.listen.port(), s.zone.as_deref(), s.data_dirs[0].to_str()), (3, Some("file"), Some("/file")));
        let dirs_only = Layer { data_dirs: Some(vec!["/d".into()]), ..Layer::default() };
        let s = merge(&none, &none, &dirs_only).unwrap();
        assert_eq!(s.listen.to_string(), DEFAULT_LISTEN);
        assert_eq!((s.zone, s.metrics, s.advertise.as_str(), s.join.len()), (None, None, "", 0));
    }

    #[test]
    fn settings_merge_key_by_key() {
        let flags = Layer { zone: Some("a".into()), ..Layer::default() };
        let env = env(&[(ENV_LISTEN, "127.0.0.1:9"), (ENV_JOIN, "h1:1, h2:2,")]);
        let file = Layer {
            data_dirs: Some(vec!["/x".into(), "/y".into()]),
            zone: Some("ignored".into()),
            metrics: Some("127.0.0.1:9100".into()),
            ..Layer::default()
        };
        let s = merge(&flags, &env, &file).unwrap();
        assert_eq!(s.zone.as_deref(), Some("a"));
        assert_eq!(s.listen.port(), 9);
        assert_eq!(s.join, vec!["h1:1".to_string(), "h2:2".to_string()]);
        assert_eq!(s.data_dirs, vec![PathBuf::from("/x"), PathBuf::from("/y")]);
        assert_eq!(s.metrics.map(|m| m.port()), Some(9100));
    }

    #[test]
    fn the_environment_splits_lists_and_ignores_empty_variables() {
        let e = env(&[(ENV_DATA_DIR, "/a,/b"), (ENV_ZONE, ""), (ENV_ADVERTISE, " h:7 ")]);
        assert_eq!(e.data_dirs, Some(vec![PathBuf::from("/a"), PathBuf::from("/b")]));
        assert_eq!(e.zone, None);
        assert_eq!(e.advertise.as_deref(), Some("h:7"));
        // An empty list in a higher layer does not hide a lower one.
        let flags = Layer { data_dirs: Some(vec![]), join: Some(vec![]), ..Layer::default() };
        let file = Layer { data_dirs: Some(vec!["/f".into()]), join: Some(vec!["j:1".into()]), ..Layer::default() };
        let s = merge(&flags, &Layer::default(), &file).unwrap();
        assert_eq!((s.data_dirs, s.join), (vec![PathBuf::from("/f")], vec!["j:1".to_string()]));
    }

    #[test]
    fn bad_values_name_where_they_came_from() {
        let dirs = Layer { data_dirs: Some(vec!["/d".into()]), ..Layer::default() };
        let none = Layer::default();
        let err = merge(&none, &env(&[(ENV_LISTEN, "nope")]), &dirs).unwrap_err();
        assert!(err.starts_with("BALLAST_LISTEN: invalid address \"nope\""), "{err}");
        let file = Layer { metrics: Some("x".into()), ..dirs.clone() };
        let err = merge(&none, &none, &file).unwrap_err();
        assert!(err.starts_with("config key metrics:"), "{err}");
        let flags = Layer { join: Some(vec!["no-port".into()]), ..Layer::default() };
        assert!(merge(&flags, &none, &dirs).unwrap_err().starts_with("--join:"));
        let flags = Layer { zone: Some("bad zone".into()), ..Layer::default() };
        assert!(merge(&flags, &none, &dirs).unwrap_err().starts_with("--zone:"));
        let err = merge(&none, &none, &none).unwrap_err();
        assert!(err.starts_with("no data directory"), "{err}");
        assert!(!err.contains('\n'));
    }

    #[test]
    fn scrub_settings_have_defaults_and_refuse_nonsense() {
        let dirs = Layer { data_dirs: Some(vec!["/d".into()]), ..Layer::default() };
        let s = merge(&Layer::default(), &Layer::default(), &dirs).unwrap();
        assert_eq!((s.scrub_rate, s.scrub_interval), (Some(DEFAULT_SCRUB_RATE), DEFAULT_SCRUB_INTERVAL));
        let s = merge(&Layer::default(), &env(&[(ENV_SCRUB_RATE, "1MiB"), (ENV_SCRUB_INTERVAL, "2h")]), &dirs).unwrap();
        assert_eq!((s.scrub_rate, s.scrub_interval), (Some(1 << 20), Duration::from_secs(7200)));
        let flags = Layer { scrub_rate: Some("unlimited".into()), ..Layer::default() };
        assert_eq!(merge(&flags, &Layer::default(), &dirs).unwrap().scrub_rate, None);
        let err = merge(&Layer::default(), &env(&[(ENV_SCRUB_RATE, "slow")]), &dirs).unwrap_err();
        assert!(err.starts_with("BALLAST_SCRUB_RATE: invalid rate"), "{err}");
        let file = Layer { scrub_interval: Some("often".into()), ..dirs };
        let err = merge(&Layer::default(), &Layer::default(), &file).unwrap_err();
        assert!(err.starts_with("config key scrub_interval: invalid duration"), "{err}");
    }

    #[test]
    fn down_after_takes_units_and_refuses_nonsense() {
        assert_eq!(parse_duration("90"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("1500ms"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration(" 1h "), Ok(Duration::from_secs(3600)));
        for bad in ["", "s", "-5s", "5 parsecs", "1.5s", "10ms"] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
        let dirs = Layer { data_dirs: Some(vec!["/d".into()]), ..Layer::default() };
        assert_eq!(merge(&Layer::default(), &Layer::default(), &dirs).unwrap().down_after, DEFAULT_DOWN_AFTER);
        let s = merge(&Layer::default(), &env(&[(ENV_DOWN_AFTER, "5s")]), &dirs).unwrap();
        assert_eq!(s.down_after, Duration::from_secs(5));
        let rate = Layer { rebuild_rate: Some("64MiB".into()), ..dirs.clone() };
        assert_eq!(merge(&Layer::default(), &Layer::default(), &rate).unwrap().rebuild_rate, Some(64 << 20));
        assert_eq!(parse_rate("unlimited"), Ok(None));
        assert_eq!(parse_rate("0"), Ok(None));
        assert!(parse_rate("fast").is_err());
        let err = merge(&Layer::default(), &env(&[(ENV_REBUILD_RATE, "fast")]), &dirs).unwrap_err();
        assert!(err.starts_with("BALLAST_REBUILD_RATE: invalid rate"), "{err}");
        let file = Layer { down_after: Some("soon".into()), ..dirs };
        let err = merge(&Layer::default(), &Layer::default(), &file).unwrap_err();
        assert!(err.starts_with("config key down_after: invalid duration \"soon\""), "{err}");
    }

    #[test]
    fn tls_files_come_all_three_or_not_at_all() {
        let dirs = Layer { data_dirs: Some(vec!["/d".into()]), ..Layer::default() };
        let none = Layer::default();
        assert_eq!(merge(&none, &none, &dirs).unwrap().tls, None);
        // The three may come from different layers.
        let flags = Layer { tls_ca: Some("/f/ca.crt".into()), ..Layer::default() };
        let env = env(&[(ENV_TLS_CERT, "/e/node.crt"), (ENV_TLS_KEY, "/e/node.key"), (ENV_TLS_CA, "/e/ca.crt")]);
        let tls = merge(&flags, &env, &dirs).unwrap().tls.expect("tls");
        assert_eq!(
            (tls.ca.to_str(), tls.cert.to_str(), tls.key.to_str()),
            (Some("/f/ca.crt"), Some("/e/node.crt"), Some("/e/node.key"))
        );
        let file = Layer { tls_cert: Some("/c".into()), ..dirs.clone() };
        let err = merge(&flags, &none, &file).unwrap_err();
        assert!(err.starts_with("TLS needs --tls-ca, --tls-cert and --tls-key together"), "{err}");
        assert!(err.ends_with("missing: --tls-key"), "{err}");
        assert!(!err.contains('\n'), "{err}");
        let text =
            "data_dirs = [\"/a\"]\ntls_ca = \"/ca\"\ntls_cert = \"/c\"\ntls_key = \"/k\"\njoin_token = \"t0k\"\n";
        let l = parse_file(Path::new("node.toml"), text).unwrap();
        let s = merge(&none, &none, &l).unwrap();
        assert_eq!(s.tls.map(|t| t.key), Some(PathBuf::from("/k")));
        assert_eq!(s.join_token.as_deref(), Some("t0k"));
    }

    #[test]
    fn join_tokens_are_checked_and_named_by_origin() {
        let dirs = Layer { data_dirs: Some(vec!["/d".into()]), ..Layer::default() };
        let none = Layer::default();
        assert_eq!(merge(&none, &none, &dirs).unwrap().join_token, None);
        let s = merge(&none, &env(&[(ENV_JOIN_TOKEN, "s3cret+/=")]), &dirs).unwrap();
        assert_eq!(s.join_token.as_deref(), Some("s3cret+/="));
        for bad in ["has space", "(none)", "ü", &"x".repeat(MAX_JOIN_TOKEN_LEN + 1)] {
            let flags = Layer { join_token: Some(bad.to_string()), ..Layer::default() };
            let err = merge(&flags, &none, &dirs).unwrap_err();
            assert!(err.starts_with("--join-token: invalid join token"), "{err}");
        }
        let file = Layer { join_token: Some("a b".into()), ..dirs };
        let err = merge(&none, &none, &file).unwrap_err();
        assert!(err.starts_with("config key join_token:"), "{err}");
    }

    #[test]
    fn the_file_has_the_flag_keys_and_refuses_others() {
        let path = Path::new("node.toml");
        let text = "data_dirs = [\"/a\"]\nlisten = \"127.0.0.1:7100\"\nadvertise = \"h:7100\"\nzone = \"z\"\n\
                    metrics = \"127.0.0.1:9100\"\njoin = [\"h:1\"]\ndown_after = \"2m\"\nrebuild_rate = \"1GiB\"\n";
        let l = parse_file(path, text).unwrap();
        assert_eq!(l.join, Some(vec!["h:1".to_string()]));
        assert_eq!(l.advertise.as_deref(), Some("h:7100"));

        let err = parse_file(path, "listen = \"127.0.0.1:1\"\nlisen = \"x\"\n").unwrap_err();
        assert!(err.starts_with("config file node.toml line 2: unknown field `lisen`"), "{err}");
        assert!(!err.contains('\n'), "{err}");
        let err = parse_file(path, "listen = [").unwrap_err();
        assert!(err.starts_with("config file node.toml line 1:"), "{err}");
        let err = parse_file(path, "listen = 7100").unwrap_err();
        assert!(err.contains("listen") || err.contains("string"), "{err}");
        let err = load_file(Path::new("/nonexistent/ballast.toml")).unwrap_err();
        assert!(err.starts_with("cannot read config file /nonexistent/ballast.toml"), "{err}");
    }
}
