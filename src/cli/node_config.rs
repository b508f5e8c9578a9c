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
//! ```
//!
//! Unknown keys are refused, so a misspelt key never silently falls back to
//! a default.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

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
/// Every variable that configures a node (the demo clears them for its children).
pub const ENV_ALL: [&str; 8] =
    [ENV_DATA_DIR, ENV_LISTEN, ENV_ADVERTISE, ENV_ZONE, ENV_METRICS, ENV_JOIN, ENV_DOWN_AFTER, ENV_REBUILD_RATE];
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
    Ok(NodeSettings { data_dirs, listen, advertise, zone, metrics, join, down_after, rebuild_rate })
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
