//! The Docker VolumeDriver protocol, independent of how volumes are stored
//! and mounted: requests are decoded into typed calls on a [`Driver`], which
//! keeps the mount reference counts and answers in the protocol's JSON.
//!
//! The protocol (Docker Engine "volume plugins", API v1.2): every call is an
//! HTTP `POST /<Method>` with a JSON body, answered with a JSON object. Every
//! answer here carries `Err` (`""` on success), and a refusal is a `200` with
//! the reason in `Err`, which Docker shows to its user as it is; a body that
//! is not the method's JSON is a `400`, an unknown method a `404`.
//!
//! | method | request | answer (besides `Err`) |
//! | --- | --- | --- |
//! | `Plugin.Activate` | - | `Implements: ["VolumeDriver"]` |
//! | `VolumeDriver.Create` | `Name`, `Opts` | - |
//! | `VolumeDriver.Remove` | `Name` | - |
//! | `VolumeDriver.Mount` | `Name`, `ID` | `Mountpoint` |
//! | `VolumeDriver.Unmount` | `Name`, `ID` | - |
//! | `VolumeDriver.Path` | `Name` | `Mountpoint` (empty when not mounted) |
//! | `VolumeDriver.Get` | `Name` | `Volume: {Name, Mountpoint?, Status}` |
//! | `VolumeDriver.List` | - | `Volumes: [{Name, Mountpoint?}]` |
//! | `VolumeDriver.Capabilities` | - | `Capabilities: {Scope: "global"}` |
//!
//! **Reference counts.** Docker sends one `Mount` per container start with
//! that container's `ID` and the matching `Unmount` when it stops. The first
//! ID mounts the volume ([`Mounter::mount`]); later IDs get the same
//! mountpoint; the last `Unmount` tears it down ([`Mounter::unmount`]). A
//! repeated `Mount` with an ID already counted counts once. An `Unmount`
//! with an ID that is not counted (Docker retrying, or an ID from before a
//! plugin restart) succeeds and changes nothing. If a teardown fails, the
//! volume stays mounted with no IDs: the next `Unmount` of it is refused
//! again with the reason, the next `Mount` reuses what is still mounted, and
//! `Remove` is refused until a teardown succeeds.
//!
//! **Scope `global`.** Volumes live in the cluster, so every Docker host
//! with this plugin sees the same ones: `List` and `Get` ask the cluster.
//! A volume is attached read-write by one host at a time (the cluster's
//! attach epoch); a `Mount` on a second host is refused while the first
//! holds it.
//!
//! **Concurrency.** Calls on different volumes run concurrently; calls on
//! one volume are serialised by a per-volume lock held across the mount or
//! teardown, so a slow mount of one volume never blocks another.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use anyhow::Result;
use ballast_types::{parse_size, validate_name, validate_volume_size, MAX_REPLICAS};
use serde::Deserialize;
use serde_json::{json, Value};

/// The volume options `docker volume create --opt K=V` accepts.
pub const OPTIONS: [&str; 4] = ["size", "replicas", "pool", "fs"];

/// A validated `VolumeDriver.Create`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateOpts {
    pub size: u64,
    /// Copies of every block: the volume goes in a pool with this replication
    /// factor (see [`Cluster::create`]).
    pub replicas: Option<u32>,
    /// The pool to put it in.
    pub pool: Option<String>,
}

/// What `Get` shows of a cluster volume (Docker prints it under `Status`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeStatus {
    pub size: u64,
    pub pool: String,
    pub replicas: u32,
}

/// The cluster side: the volumes that exist, whoever mounts them.
///
/// Errors are shown to Docker's user as they are, so they must read well on
/// their own (name the volume or option).
pub trait Cluster: Send + Sync + 'static {
    /// Create a volume (its pool chosen as `opts` say). A volume of that
    /// name that exists already with the same size counts as created.
    fn create(&self, name: &str, opts: &CreateOpts) -> impl Future<Output = Result<()>> + Send;
    /// Delete a volume and its data; a volume that does not exist counts as
    /// deleted.
    fn remove(&self, name: &str) -> impl Future<Output = Result<()>> + Send;
    /// One volume; `None` when there is no such volume.
    fn get(&self, name: &str) -> impl Future<Output = Result<Option<VolumeStatus>>> + Send;
    /// Every volume's name.
    fn list(&self) -> impl Future<Output = Result<Vec<String>>> + Send;
}

/// The host side: makes a volume's file system appear at a mountpoint.
///
/// A [`Mounter::Mounted`] records what is set up; [`Mounter::unmount`]
/// undoes it step by step and forgets each step once done, so after a
/// failure, calling it again continues where it stopped.
pub trait Mounter: Send + Sync + 'static {
    type Mounted: Send + 'static;
    /// Attach `name` and mount its file system (made on first use).
    fn mount(&self, name: &str) -> impl Future<Output = Result<Self::Mounted>> + Send;
    fn mountpoint(&self, mounted: &Self::Mounted) -> PathBuf;
    /// Tear down what `mounted` still holds; `Ok` once nothing is left.
    fn unmount(&self, mounted: &mut Self::Mounted) -> impl Future<Output = Result<()>> + Send;
}

/// One volume's mount, shared by the container IDs in `ids`.
struct Mount<M> {
    mounted: M,
    ids: BTreeSet<String>,
}

/// The protocol's state: mounts by volume name, each behind its own lock.
pub struct Driver<C, M: Mounter> {
    cluster: C,
    mounter: M,
    volumes: Mutex<HashMap<String, Slot<M::Mounted>>>,
}

type Slot<T> = Arc<tokio::sync::Mutex<Option<Mount<T>>>>;

#[derive(Deserialize)]
struct NameReq {
    #[serde(rename = "Name")]
    name: String,
}

#[derive(Deserialize)]
struct CreateReq {
    #[serde(rename = "Name")]
    name: String,
    #[serde(rename = "Opts", default)]
    opts: Option<BTreeMap<String, String>>,
}

#[derive(Deserialize)]
struct MountReq {
    #[serde(rename = "Name")]
    name: String,
    #[serde(rename = "ID", default)]
    id: String,
}

/// An HTTP status and a JSON body.
pub type Reply = (u16, Value);

fn ok(mut v: Value) -> Reply {
    v["Err"] = json!("");
    (200, v)
}

fn refused(e: impl std::fmt::Display) -> Reply {
    (200, json!({ "Err": e.to_string() }))
}

impl<C: Cluster, M: Mounter> Driver<C, M> {
    pub fn new(cluster: C, mounter: M) -> Self {
        Self { cluster, mounter, volumes: Mutex::new(HashMap::new()) }
    }

    /// Answer one protocol call: `method` is the request path without its
    /// leading `/`, `body` the request body (empty counts as `{}`).
    pub async fn handle(&self, method: &str, body: &[u8]) -> Reply {
        let body: &[u8] = if body.iter().all(u8::is_ascii_whitespace) { b"{}" } else { body };
        match method {
            "Plugin.Activate" => (200, json!({ "Implements": ["VolumeDriver"], "Err": "" })),
            "VolumeDriver.Capabilities" => ok(json!({ "Capabilities": { "Scope": "global" } })),
            "VolumeDriver.List" => self.list().await,
            "VolumeDriver.Create" => match serde_json::from_slice::<CreateReq>(body) {
                Ok(r) => self.create(&r.name, r.opts.unwrap_or_default()).await,
                Err(e) => bad_request(method, e),
            },
            "VolumeDriver.Remove" | "VolumeDriver.Path" | "VolumeDriver.Get" => {
                let r = match serde_json::from_slice::<NameReq>(body) {
                    Ok(r) => r,
                    Err(e) => return bad_request(method, e),
                };
                if let Err(e) = check_name(&r.name) {
                    return refused(e);
                }
                match method {
                    "VolumeDriver.Remove" => self.remove(&r.name).await,
                    "VolumeDriver.Path" => ok(json!({ "Mountpoint": self.mountpoint_of(&r.name).await })),
                    _ => self.get(&r.name).await,
                }
            }
            "VolumeDriver.Mount" | "VolumeDriver.Unmount" => {
                let r = match serde_json::from_slice::<MountReq>(body) {
                    Ok(r) => r,
                    Err(e) => return bad_request(method, e),
                };
                if let Err(e) = check_name(&r.name) {
                    return refused(e);
                }
                if method == "VolumeDriver.Mount" {
                    self.mount(&r.name, &r.id).await
                } else {
                    self.unmount(&r.name, &r.id).await
                }
            }
            _ => (404, json!({ "Err": format!("unknown method {method:?}: this plugin implements VolumeDriver") })),
        }
    }

    fn slot(&self, name: &str) -> Slot<M::Mounted> {
        let mut v = self.volumes.lock().unwrap_or_else(|e| e.into_inner());
        v.entry(name.to_owned()).or_default().clone()
    }

    /// The mountpoint of `name` if it is mounted now; empty otherwise (also
    /// while a mount or teardown of it is under way).
    async fn mountpoint_of(&self, name: &str) -> String {
        let slot = self.slot(name);
        let guard = slot.try_lock();
        match guard.as_deref() {
            Ok(Some(m)) => self.mounter.mountpoint(&m.mounted).display().to_string(),
            _ => String::new(),
        }
    }

    async fn create(&self, name: &str, opts: BTreeMap<String, String>) -> Reply {
        let opts = match check_name(name).and_then(|()| parse_create_opts(&opts)) {
            Ok(o) => o,
            Err(e) => return refused(e),
        };
        match self.cluster.create(name, &opts).await {
            Ok(()) => {
                tracing::info!(volume = name, size = opts.size, "created");
                ok(json!({}))
            }
            Err(e) => refused(format!("creating volume {name:?}: {e:#}")),
        }
    }

    async fn remove(&self, name: &str) -> Reply {
        let slot = self.slot(name);
        let guard = slot.lock().await;
        if let Some(m) = guard.as_ref() {
            return refused(format!(
                "volume {name:?} is mounted at {} (by {} container(s)): stop them first",
                self.mounter.mountpoint(&m.mounted).display(),
                m.ids.len()
            ));
        }
        match self.cluster.remove(name).await {
            Ok(()) => {
                tracing::info!(volume = name, "removed");
                ok(json!({}))
            }
            Err(e) => refused(format!("removing volume {name:?}: {e:#}")),
        }
    }

    async fn get(&self, name: &str) -> Reply {
        match self.cluster.get(name).await {
            Ok(Some(s)) => {
                let mut v = json!({
                    "Name": name,
                    "Status": { "size": s.size, "pool": s.pool, "replicas": s.replicas },
                });
                let mp = self.mountpoint_of(name).await;
                if !mp.is_empty() {
                    v["Mountpoint"] = json!(mp);
                }
                ok(json!({ "Volume": v }))
            }
            Ok(None) => refused(format!("no such volume: {name:?}")),
            Err(e) => refused(format!("looking up volume {name:?}: {e:#}")),
        }
    }

    async fn list(&self) -> Reply {
        let names = match self.cluster.list().await {
            Ok(n) => n,
            Err(e) => return refused(format!("listing volumes: {e:#}")),
        };
        let mut out = Vec::with_capacity(names.len());
        for name in names {
            let mp = self.mountpoint_of(&name).await;
            out.push(if mp.is_empty() { json!({ "Name": name }) } else { json!({ "Name": name, "Mountpoint": mp }) });
        }
        ok(json!({ "Volumes": out }))
    }

    async fn mount(&self, name: &str, id: &str) -> Reply {
        let slot = self.slot(name);
        let mut guard = slot.lock().await;
        if guard.is_none() {
            match self.mounter.mount(name).await {
                Ok(mounted) => *guard = Some(Mount { mounted, ids: BTreeSet::new() }),
                Err(e) => {
                    tracing::warn!(volume = name, "mount failed: {e:#}");
                    return refused(format!("mounting volume {name:?}: {e:#}"));
                }
            }
        }
        let m = guard.as_mut().expect("mounted above");
        m.ids.insert(id.to_owned());
        let mp = self.mounter.mountpoint(&m.mounted);
        tracing::info!(volume = name, id, users = m.ids.len(), mountpoint = %mp.display(), "mounted");
        ok(json!({ "Mountpoint": mp.display().to_string() }))
    }

    async fn unmount(&self, name: &str, id: &str) -> Reply {
        let slot = self.slot(name);
        let mut guard = slot.lock().await;
        let Some(m) = guard.as_mut() else {
            tracing::info!(volume = name, id, "unmount of a volume that is not mounted: nothing to do");
            return ok(json!({}));
        };
        let counted = m.ids.remove(id);
        if !counted && !m.ids.is_empty() {
            tracing::info!(volume = name, id, "unmount by an ID that did not mount it: nothing to do");
            return ok(json!({}));
        }
        if !m.ids.is_empty() {
            tracing::info!(volume = name, id, users = m.ids.len(), "still in use");
            return ok(json!({}));
        }
        match self.mounter.unmount(&mut m.mounted).await {
            Ok(()) => {
                *guard = None;
                tracing::info!(volume = name, id, "unmounted and detached");
                ok(json!({}))
            }
            Err(e) => {
                tracing::warn!(volume = name, "teardown failed (kept; the next unmount retries): {e:#}");
                refused(format!("unmounting volume {name:?}: {e:#}"))
            }
        }
    }

    /// Tear down every mount (at shutdown); reports the first failure after
    /// trying all.
    pub async fn unmount_all(&self) -> Result<()> {
        let slots: Vec<(String, Slot<M::Mounted>)> = {
            let v = self.volumes.lock().unwrap_or_else(|e| e.into_inner());
            v.iter().map(|(n, s)| (n.clone(), s.clone())).collect()
        };
        let mut first = None;
        for (name, slot) in slots {
            let mut guard = slot.lock().await;
            if let Some(m) = guard.as_mut() {
                match self.mounter.unmount(&mut m.mounted).await {
                    Ok(()) => {
                        tracing::info!(volume = %name, users = m.ids.len(), "unmounted at shutdown");
                        *guard = None;
                    }
                    Err(e) => {
                        tracing::warn!(volume = %name, "teardown at shutdown failed: {e:#}");
                        first.get_or_insert(e.context(format!("unmounting volume {name:?}")));
                    }
                }
            }
        }
        first.map_or(Ok(()), Err)
    }
}

fn bad_request(method: &str, e: serde_json::Error) -> Reply {
    (400, json!({ "Err": format!("{method}: malformed request body: {e}") }))
}

fn check_name(name: &str) -> Result<(), String> {
    validate_name(name).map_err(|e| format!("invalid volume name {name:?}: {e}"))
}

/// Validate `docker volume create` options: `size` (required, e.g. `10GiB`),
/// `replicas` (1..=5), `pool`, `fs` (only `ext4`); any other key is refused
/// by name.
pub fn parse_create_opts(opts: &BTreeMap<String, String>) -> Result<CreateOpts, String> {
    if let Some(k) = opts.keys().find(|k| !OPTIONS.contains(&k.as_str())) {
        return Err(format!("unknown option {k:?}: this driver takes {}", OPTIONS.join(", ")));
    }
    let size = match opts.get("size") {
        None => return Err("option size is required, e.g. --opt size=10GiB".into()),
        Some(s) => {
            let size = parse_size(s).map_err(|e| format!("option size: {e}"))?;
            validate_volume_size(size).map_err(|e| format!("option size {s:?}: {e}"))?;
            size
        }
    };
    let replicas = match opts.get("replicas") {
        None => None,
        Some(r) => match r.trim().parse::<u32>() {
            Ok(n) if (1..=MAX_REPLICAS).contains(&n) => Some(n),
            _ => return Err(format!("option replicas {r:?}: expected a whole number from 1 to {MAX_REPLICAS}")),
        },
    };
    let pool = match opts.get("pool") {
        None => None,
        Some(p) => {
            validate_name(p).map_err(|e| format!("option pool {p:?}: {e}"))?;
            Some(p.clone())
        }
    };
    if let Some(fs) = opts.get("fs") {
        if fs != "ext4" {
            return Err(format!("option fs {fs:?}: only ext4 is supported"));
        }
    }
    Ok(CreateOpts { size, replicas, pool })
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};

    /// The cluster as a map of name → status.
    #[derive(Default)]
    pub struct Volumes {
        map: Mutex<BTreeMap<String, VolumeStatus>>,
    }

    impl Cluster for Arc<Volumes> {
        async fn create(&self, name: &str, opts: &CreateOpts) -> Result<()> {
            let mut m = self.map.lock().unwrap();
            if m.get(name).is_some_and(|v| v.size != opts.size) {
                anyhow::bail!("exists with another size");
            }
            let pool = opts.pool.clone().unwrap_or_else(|| "default".into());
            m.insert(name.into(), VolumeStatus { size: opts.size, pool, replicas: opts.replicas.unwrap_or(3) });
            Ok(())
        }
        async fn remove(&self, name: &str) -> Result<()> {
            self.map.lock().unwrap().remove(name);
            Ok(())
        }
        async fn get(&self, name: &str) -> Result<Option<VolumeStatus>> {
            Ok(self.map.lock().unwrap().get(name).cloned())
        }
        async fn list(&self) -> Result<Vec<String>> {
            Ok(self.map.lock().unwrap().keys().cloned().collect())
        }
    }

    /// Mounts as log lines; `fail_next_unmount` makes one teardown fail.
    #[derive(Default)]
    pub struct Log {
        pub events: Mutex<Vec<String>>,
        fail_next_unmount: AtomicBool,
    }

    impl Mounter for Arc<Log> {
        type Mounted = String;
        async fn mount(&self, name: &str) -> Result<String> {
            if name == "broken" {
                anyhow::bail!("attach refused: CONFLICT");
            }
            self.events.lock().unwrap().push(format!("mount {name}"));
            Ok(name.to_owned())
        }
        fn mountpoint(&self, m: &String) -> PathBuf {
            PathBuf::from(format!("/plugin/{m}/data"))
        }
        async fn unmount(&self, m: &mut String) -> Result<()> {
            if self.fail_next_unmount.swap(false, Ordering::SeqCst) {
                anyhow::bail!("umount: target is busy");
            }
            self.events.lock().unwrap().push(format!("unmount {m}"));
            Ok(())
        }
    }

    pub type D = Driver<Arc<Volumes>, Arc<Log>>;

    pub fn driver() -> (D, Arc<Volumes>, Arc<Log>) {
        let (v, l) = (Arc::new(Volumes::default()), Arc::new(Log::default()));
        (Driver::new(v.clone(), l.clone()), v, l)
    }

    async fn call(d: &D, method: &str, body: Value) -> Reply {
        d.handle(method, body.to_string().as_bytes()).await
    }

    fn err(r: &Reply) -> &str {
        r.1["Err"].as_str().expect("every reply carries Err")
    }

    fn events(l: &Log) -> Vec<String> {
        l.events.lock().unwrap().clone()
    }

    #[tokio::test]
    async fn activation_and_capabilities_have_the_protocol_shape() {
        let (d, _, _) = driver();
        assert_eq!(d.handle("Plugin.Activate", b"").await, (200, json!({"Implements": ["VolumeDriver"], "Err": ""})));
        assert_eq!(
            d.handle("VolumeDriver.Capabilities", b"{}").await,
            (200, json!({"Capabilities": {"Scope": "global"}, "Err": ""}))
        );
        let unknown = d.handle("VolumeDriver.Snapshot", b"{}").await;
        assert_eq!(unknown.0, 404);
        assert!(err(&unknown).contains("unknown method"), "{unknown:?}");
        let garbage = d.handle("VolumeDriver.Mount", b"{\"Name\": 7").await;
        assert_eq!(garbage.0, 400);
        assert!(err(&garbage).contains("malformed"), "{garbage:?}");
    }

    #[tokio::test]
    async fn create_checks_every_option_and_get_and_list_report_the_cluster() {
        let (d, v, _) = driver();
        let cases = [
            (json!({}), "size is required"),
            (json!({"size": "1GiB", "iops": "9"}), "unknown option \"iops\""),
            (json!({"size": "3parsecs"}), "option size"),
            (json!({"size": "1000"}), "option size \"1000\""),
            (json!({"size": "1GiB", "replicas": "0"}), "option replicas \"0\""),
            (json!({"size": "1GiB", "replicas": "three"}), "option replicas"),
            (json!({"size": "1GiB", "fs": "xfs"}), "only ext4"),
            (json!({"size": "1GiB", "pool": "no/slash"}), "option pool"),
        ];
        for (opts, want) in cases {
            let r = call(&d, "VolumeDriver.Create", json!({"Name": "pg", "Opts": opts})).await;
            assert_eq!(r.0, 200);
            assert!(err(&r).contains(want), "opts {opts}: {r:?}");
        }
        assert!(v.map.lock().unwrap().is_empty(), "nothing created by a refused call");
        let bad_name = call(&d, "VolumeDriver.Create", json!({"Name": "a b", "Opts": {"size": "1GiB"}})).await;
        assert!(err(&bad_name).contains("invalid volume name"), "{bad_name:?}");

        let r = call(&d, "VolumeDriver.Create", json!({"Name": "pg", "Opts": {"size": "1GiB", "replicas": "3"}})).await;
        assert_eq!(r, (200, json!({"Err": ""})));
        // Docker sends `Opts: null` when no option was given.
        let r = call(&d, "VolumeDriver.Create", json!({"Name": "nosize", "Opts": null})).await;
        assert!(err(&r).contains("size is required"), "{r:?}");

        let got = call(&d, "VolumeDriver.Get", json!({"Name": "pg"})).await;
        assert_eq!(
            got,
            (
                200,
                json!({"Volume": {"Name": "pg", "Status": {"size": 1u64 << 30, "pool": "default", "replicas": 3}}, "Err": ""})
            )
        );
        let missing = call(&d, "VolumeDriver.Get", json!({"Name": "nope"})).await;
        assert!(err(&missing).contains("no such volume"), "{missing:?}");
        let list = call(&d, "VolumeDriver.List", json!({})).await;
        assert_eq!(list, (200, json!({"Volumes": [{"Name": "pg"}], "Err": ""})));
    }

    #[tokio::test]
    async fn the_first_mount_id_mounts_and_the_last_unmount_tears_down() {
        let (d, _, l) = driver();
        call(&d, "VolumeDriver.Create", json!({"Name": "pg", "Opts": {"size": "1GiB"}})).await;
        let path = call(&d, "VolumeDriver.Path", json!({"Name": "pg"})).await;
        assert_eq!(path, (200, json!({"Mountpoint": "", "Err": ""})));

        let m1 = call(&d, "VolumeDriver.Mount", json!({"Name": "pg", "ID": "c1"})).await;
        assert_eq!(m1, (200, json!({"Mountpoint": "/plugin/pg/data", "Err": ""})));
        let m2 = call(&d, "VolumeDriver.Mount", json!({"Name": "pg", "ID": "c2"})).await;
        assert_eq!(m2, m1);
        let again = call(&d, "VolumeDriver.Mount", json!({"Name": "pg", "ID": "c2"})).await;
        assert_eq!(again, m1);
        assert_eq!(events(&l), ["mount pg"], "one mount for all IDs");

        let path = call(&d, "VolumeDriver.Path", json!({"Name": "pg"})).await;
        assert_eq!(path.1["Mountpoint"], "/plugin/pg/data");
        let got = call(&d, "VolumeDriver.Get", json!({"Name": "pg"})).await;
        assert_eq!(got.1["Volume"]["Mountpoint"], "/plugin/pg/data");
        let list = call(&d, "VolumeDriver.List", json!({})).await;
        assert_eq!(list.1["Volumes"], json!([{"Name": "pg", "Mountpoint": "/plugin/pg/data"}]));

        let rm = call(&d, "VolumeDriver.Remove", json!({"Name": "pg"})).await;
        assert!(err(&rm).contains("is mounted at /plugin/pg/data (by 2 container(s))"), "{rm:?}");

        for id in ["c1", "stranger"] {
            let u = call(&d, "VolumeDriver.Unmount", json!({"Name": "pg", "ID": id})).await;
            assert_eq!(u, (200, json!({"Err": ""})), "unmount by {id}");
        }
        assert_eq!(events(&l), ["mount pg"], "c2 still uses it");
        let u = call(&d, "VolumeDriver.Unmount", json!({"Name": "pg", "ID": "c2"})).await;
        assert_eq!(u, (200, json!({"Err": ""})));
        assert_eq!(events(&l), ["mount pg", "unmount pg"]);
        let u = call(&d, "VolumeDriver.Unmount", json!({"Name": "pg", "ID": "c2"})).await;
        assert_eq!(u, (200, json!({"Err": ""})), "a repeated unmount is harmless");
        assert_eq!(events(&l).len(), 2);

        let rm = call(&d, "VolumeDriver.Remove", json!({"Name": "pg"})).await;
        assert_eq!(rm, (200, json!({"Err": ""})));
        let list = call(&d, "VolumeDriver.List", json!({})).await;
        assert_eq!(list, (200, json!({"Volumes": [], "Err": ""})));
    }

    #[tokio::test]
    async fn a_failed_mount_counts_nothing_and_a_failed_teardown_is_retried() {
        let (d, _, l) = driver();
        let r = call(&d, "VolumeDriver.Mount", json!({"Name": "broken", "ID": "c1"})).await;
        assert_eq!(r.0, 200);
        assert!(err(&r).contains("mounting volume \"broken\": attach refused: CONFLICT"), "{r:?}");
        let p = call(&d, "VolumeDriver.Path", json!({"Name": "broken"})).await;
        assert_eq!(p.1["Mountpoint"], "");

        call(&d, "VolumeDriver.Mount", json!({"Name": "pg", "ID": "c1"})).await;
        l.fail_next_unmount.store(true, Ordering::SeqCst);
        let u = call(&d, "VolumeDriver.Unmount", json!({"Name": "pg", "ID": "c1"})).await;
        assert!(err(&u).contains("target is busy"), "{u:?}");
        let rm = call(&d, "VolumeDriver.Remove", json!({"Name": "pg"})).await;
        assert!(err(&rm).contains("is mounted"), "{rm:?}");
        // The next container reuses the mount that is still there ...
        let m = call(&d, "VolumeDriver.Mount", json!({"Name": "pg", "ID": "c3"})).await;
        assert_eq!(m.1["Mountpoint"], "/plugin/pg/data");
        assert_eq!(events(&l), ["mount pg"]);
        // ... and its unmount finishes the teardown.
        let u = call(&d, "VolumeDriver.Unmount", json!({"Name": "pg", "ID": "c3"})).await;
        assert_eq!(u, (200, json!({"Err": ""})));
        assert_eq!(events(&l), ["mount pg", "unmount pg"]);

        // A teardown that failed with no ID left is retried by a repeated Unmount.
        call(&d, "VolumeDriver.Mount", json!({"Name": "pg", "ID": "c4"})).await;
        l.fail_next_unmount.store(true, Ordering::SeqCst);
        assert!(!err(&call(&d, "VolumeDriver.Unmount", json!({"Name": "pg", "ID": "c4"})).await).is_empty());
        let u = call(&d, "VolumeDriver.Unmount", json!({"Name": "pg", "ID": "c4"})).await;
        assert_eq!(u, (200, json!({"Err": ""})));

        call(&d, "VolumeDriver.Mount", json!({"Name": "pg", "ID": "c5"})).await;
        d.unmount_all().await.unwrap();
        assert_eq!(events(&l).iter().filter(|e| *e == "unmount pg").count(), 3);
    }
}
