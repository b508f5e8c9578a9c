//! [`Mounter`] on this host: a volume attached read-write and served over
//! NBD on a private unix socket by this process, made a block device, given
//! an ext4 file system on first use and mounted.
//!
//! Everything for volume `NAME` lives in `ROOT/NAME/`:
//!
//! | path | what |
//! | --- | --- |
//! | `nbd.sock` | this process's NBD server for the one volume (`ClusterExports::attach_one`) |
//! | `fuse/disk` | without the kernel nbd module: `nbdfuse` exposes the export as this file, which `losetup` makes `/dev/loopN` |
//! | `data/` | the ext4 mount, the `Mountpoint` Docker bind-mounts into containers |
//! | `state.json` | what is set up (epoch, loop or nbd device), for a restarted plugin to clean up |
//!
//! The block device is `/dev/nbdN` through `nbd-client -unix` when the
//! kernel's nbd module is loaded and `nbd-client` is installed, otherwise
//! the loop device over `nbdfuse`. Teardown goes in reverse: `umount`,
//! `losetup -d` / `nbd-client -d`, `fusermount3 -u` (nbdfuse exits), stop
//! serving, detach (the attach epoch is released, so another host can mount
//! the volume next).
//!
//! **Restart.** A plugin that dies leaves its mounts without an NBD server:
//! their I/O fails and cannot be revived. At start, [`recover`] tears down
//! what every `state.json` lists (lazily: containers may still hold the old
//! mount) and releases the recorded attachment, so the next `Mount` starts
//! clean. Containers that used such a mount must be restarted.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use ballast_client::{AdminClient, ClientConfig, ClusterExports};
use ballast_nbd::{NbdServer, ServerConfig};
use ballast_types::{DetachVolume, Epoch};
use serde::{Deserialize, Serialize};
use tokio::process::{Child, Command};

use super::driver::Mounter;
use crate::cli::serve::{bind_unix, Listeners};

/// Longest any one tool may take (mkfs of a large volume over the network included).
const TOOL_TIMEOUT: Duration = Duration::from_secs(300);
/// How long nbdfuse may take to show its file, and to exit after unmount.
const FUSE_TIMEOUT: Duration = Duration::from_secs(30);
const STATE: &str = "state.json";

/// How the block device is made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DevicePath {
    /// `nbd-client -unix` on `/dev/nbdN` (the kernel module is loaded).
    Kernel,
    /// `nbdfuse` + `losetup`.
    Fuse,
}

impl DevicePath {
    /// The kernel path when `/sys/module/nbd` exists and `nbd-client` runs.
    pub fn detect() -> Self {
        let module = Path::new("/sys/module/nbd").exists();
        let client = std::process::Command::new("nbd-client")
            .arg("--help")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok();
        if module && client {
            Self::Kernel
        } else {
            Self::Fuse
        }
    }
}

pub struct HostMounter {
    pub admin: AdminClient,
    pub config: ClientConfig,
    pub root: PathBuf,
    pub device: DevicePath,
}

/// What [`Mounted`] records on disk for [`recover`].
#[derive(Serialize, Deserialize, Default)]
struct State {
    volume: String,
    epoch: Option<u64>,
    loop_dev: Option<String>,
    nbd_dev: Option<String>,
}

/// One volume's mount stack; each field is `None` once torn down.
pub struct Mounted {
    name: String,
    dir: PathBuf,
    data: PathBuf,
    export: Option<Arc<ClusterExports>>,
    listeners: Option<Listeners<ClusterExports>>,
    nbdfuse: Option<Child>,
    loop_dev: Option<String>,
    nbd_dev: Option<String>,
    mounted: bool,
}

impl Mounter for HostMounter {
    type Mounted = Mounted;

    async fn mount(&self, name: &str) -> Result<Mounted> {
        let dir = self.root.join(name);
        let mut m = Mounted {
            name: name.to_owned(),
            data: dir.join("data"),
            dir,
            export: None,
            listeners: None,
            nbdfuse: None,
            loop_dev: None,
            nbd_dev: None,
            mounted: false,
        };
        match self.set_up(&mut m).await {
            Ok(()) => Ok(m),
            Err(e) => {
                if let Err(t) = self.unmount(&mut m).await {
                    tracing::warn!(volume = name, "undoing a failed mount failed too: {t:#}");
                }
                Err(e)
            }
        }
    }

    fn mountpoint(&self, m: &Mounted) -> PathBuf {
        m.data.clone()
    }

    async fn unmount(&self, m: &mut Mounted) -> Result<()> {
        if m.mounted {
            run("umount", [m.data.as_os_str()]).await?;
            m.mounted = false;
        }
        if let Some(dev) = m.nbd_dev.clone() {
            run("nbd-client", ["-d", dev.as_str()]).await?;
            m.nbd_dev = None;
        }
        if let Some(dev) = m.loop_dev.clone() {
            run("losetup", ["-d", dev.as_str()]).await?;
            m.loop_dev = None;
        }
        if let Some(child) = m.nbdfuse.as_mut() {
            unmount_fuse(&m.dir.join("fuse"), child).await?;
            m.nbdfuse = None;
        }
        if let Some(l) = m.listeners.take() {
            if let Err(e) = l.stop().await {
                tracing::warn!(volume = %m.name, "NBD listener: {e:#}");
            }
        }
        if let Some(export) = &m.export {
            export.detach_all().await.with_context(|| format!("detaching volume {:?}", m.name))?;
            m.export = None;
        }
        let _ = std::fs::remove_file(m.dir.join(STATE));
        Ok(())
    }
}

impl HostMounter {
    async fn set_up(&self, m: &mut Mounted) -> Result<()> {
        let (sock, fuse) = (m.dir.join("nbd.sock"), m.dir.join("fuse"));
        for d in [&m.dir, &m.data, &fuse] {
            std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
        }
        let export = ClusterExports::attach_one(self.admin.clone(), &m.name, false, false, self.config)
            .await
            .with_context(|| format!("attaching {:?}", m.name))?;
        m.export = Some(export.clone());
        let epoch = self.admin.volume(&m.name).await.ok().map(|v| v.epoch.0);
        let mut listeners = Listeners::new(NbdServer::new(export, ServerConfig::default()));
        listeners.unix(bind_unix(&sock)?, sock.clone());
        m.listeners = Some(listeners);
        let state = |m: &Mounted| State {
            volume: m.name.clone(),
            epoch,
            loop_dev: m.loop_dev.clone(),
            nbd_dev: m.nbd_dev.clone(),
        };
        write_state(&m.dir, &state(m))?;

        let dev = match self.device {
            DevicePath::Kernel => {
                let dev = free_nbd_device()?;
                run("nbd-client", ["-unix", path_str(&sock)?, "-N", &m.name, &dev]).await?;
                m.nbd_dev = Some(dev.clone());
                dev
            }
            DevicePath::Fuse => {
                m.nbdfuse = Some(start_nbdfuse(&m.name, &sock, &fuse).await?);
                let out = run("losetup", ["--find", "--show", path_str(&fuse.join("disk"))?]).await?;
                let dev = out.trim().to_string();
                if !dev.starts_with("/dev/loop") {
                    bail!("losetup printed {dev:?}, not a loop device");
                }
                m.loop_dev = Some(dev.clone());
                dev
            }
        };
        write_state(&m.dir, &state(m))?;

        match fs_type(&dev).await? {
            None => {
                tracing::info!(volume = %m.name, %dev, "no file system yet: mkfs.ext4");
                run("mkfs.ext4", ["-q", "-F", "-E", "nodiscard", &dev]).await?;
            }
            Some(t) if t == "ext4" => {}
            Some(t) => bail!("volume {:?} holds a {t} file system; only ext4 is mounted", m.name),
        }
        run("mount", ["-t", "ext4", &dev, path_str(&m.data)?]).await?;
        m.mounted = true;
        Ok(())
    }
}

fn path_str(p: &Path) -> Result<&str> {
    p.to_str().with_context(|| format!("{} is not UTF-8", p.display()))
}

fn write_state(dir: &Path, s: &State) -> Result<()> {
    let path = dir.join(STATE);
    let tmp = dir.join(format!("{STATE}.tmp"));
    std::fs::write(&tmp, serde_json::to_vec_pretty(s)?).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, &path).with_context(|| format!("renaming to {}", path.display()))
}

/// Run a tool to completion; its stdout, or an error with its stderr.
async fn run<I, S>(tool: &str, args: I) -> Result<String>
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let mut c = Command::new(tool);
    c.args(args).stdin(Stdio::null()).kill_on_drop(true);
    let line = format!("{c:?}");
    let out = tokio::time::timeout(TOOL_TIMEOUT, c.output())
        .await
        .with_context(|| format!("{line} did not finish in {} s", TOOL_TIMEOUT.as_secs()))?
        .with_context(|| format!("cannot run {tool} (is it installed?)"))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        bail!("{line} failed ({}): {}", out.status, err.trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The file system on `dev`, `None` when blkid finds none (its exit code 2).
async fn fs_type(dev: &str) -> Result<Option<String>> {
    let out = Command::new("blkid")
        .args(["-p", "-o", "value", "-s", "TYPE", dev])
        .stdin(Stdio::null())
        .output()
        .await
        .context("cannot run blkid (is it installed?)")?;
    match out.status.code() {
        Some(0) => {
            let t = String::from_utf8_lossy(&out.stdout).trim().to_string();
            Ok((!t.is_empty()).then_some(t))
        }
        Some(2) => Ok(None),
        _ => bail!("blkid -p {dev} failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim()),
    }
}

/// `nbdfuse FUSE/disk nbd+unix:///NAME?socket=SOCK`, ready once its pid file
/// and the file exist.
async fn start_nbdfuse(name: &str, sock: &Path, fuse: &Path) -> Result<Child> {
    let pidfile = fuse.with_extension("pid");
    let _ = std::fs::remove_file(&pidfile);
    let uri = format!("nbd+unix:///{name}?socket={}", path_str(sock)?);
    let file = fuse.join("disk");
    let mut child = Command::new("nbdfuse")
        .arg("-P")
        .arg(&pidfile)
        .arg(&file)
        .arg(&uri)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot run nbdfuse (is it installed? package libnbd-bin)")?;
    let deadline = tokio::time::Instant::now() + FUSE_TIMEOUT;
    loop {
        if pidfile.exists() && file.exists() {
            return Ok(child);
        }
        if let Some(st) = child.try_wait()? {
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                use tokio::io::AsyncReadExt;
                let _ = e.read_to_string(&mut err).await;
            }
            bail!("nbdfuse {uri} exited with {st}: {}", err.trim());
        }
        if tokio::time::Instant::now() > deadline {
            let _ = child.kill().await;
            bail!("nbdfuse {uri} did not show {} in {} s", file.display(), FUSE_TIMEOUT.as_secs());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Unmount nbdfuse's mount and reap it. The loop driver lets go of the file
/// asynchronously after `losetup -d`, so a busy mount is retried for a while.
async fn unmount_fuse(fuse: &Path, child: &mut Child) -> Result<()> {
    let deadline = tokio::time::Instant::now() + FUSE_TIMEOUT;
    loop {
        if child.try_wait()?.is_some() {
            break;
        }
        match run("fusermount3", [std::ffi::OsStr::new("-u"), fuse.as_os_str()]).await {
            Ok(_) => break,
            Err(e) if tokio::time::Instant::now() > deadline => return Err(e),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    match tokio::time::timeout(FUSE_TIMEOUT, child.wait()).await {
        Ok(r) => {
            r.context("waiting for nbdfuse")?;
        }
        Err(_) => {
            tracing::warn!(fuse = %fuse.display(), "nbdfuse did not exit after its unmount: killed");
            child.kill().await.context("killing nbdfuse")?;
        }
    }
    let _ = std::fs::remove_file(fuse.with_extension("pid"));
    Ok(())
}

/// The first `/dev/nbdN` no client holds (no `/sys/block/nbdN/pid`).
fn free_nbd_device() -> Result<String> {
    for n in 0..256 {
        let sys = PathBuf::from(format!("/sys/block/nbd{n}"));
        if !sys.exists() {
            break;
        }
        if !sys.join("pid").exists() {
            return Ok(format!("/dev/nbd{n}"));
        }
    }
    bail!("no free /dev/nbdN (load the module with more devices: modprobe nbd nbds_max=64)")
}

/// Whether `path` is a mount point now (in this process's mount namespace).
fn is_mounted(path: &Path) -> bool {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else { return false };
    let want = path.to_string_lossy();
    // Field 5 is the mount point, with spaces etc. octal-escaped.
    info.lines().any(|l| l.split(' ').nth(4).is_some_and(|m| m.replace("\\040", " ") == want))
}

/// Clean up after a plugin that died with volumes mounted (see the module
/// documentation): for each `ROOT/NAME/state.json`, lazily unmount, release
/// the device, unmount nbdfuse, detach the recorded epoch if it is still the
/// volume's. Failures are logged; what was cleaned up is returned.
pub async fn recover(root: &Path, admin: &AdminClient) -> Vec<String> {
    let mut cleaned = Vec::new();
    let Ok(entries) = std::fs::read_dir(root) else { return cleaned };
    for e in entries.flatten() {
        let dir = e.path();
        let Ok(text) = std::fs::read(dir.join(STATE)) else { continue };
        let s: State = match serde_json::from_slice(&text) {
            Ok(s) => s,
            Err(err) => {
                tracing::warn!(dir = %dir.display(), "unreadable {STATE}: {err}; left alone");
                continue;
            }
        };
        tracing::warn!(volume = %s.volume, "left over from an earlier run: tearing it down");
        let steps: Vec<(&str, Vec<String>)> = [
            is_mounted(&dir.join("data"))
                .then(|| ("umount", vec!["-l".into(), dir.join("data").display().to_string()])),
            s.nbd_dev.clone().map(|d| ("nbd-client", vec!["-d".into(), d])),
            s.loop_dev.clone().map(|d| ("losetup", vec!["-d".into(), d])),
            is_mounted(&dir.join("fuse"))
                .then(|| ("fusermount3", vec!["-uz".into(), dir.join("fuse").display().to_string()])),
        ]
        .into_iter()
        .flatten()
        .collect();
        for (tool, args) in steps {
            if let Err(err) = run(tool, &args).await {
                tracing::warn!(volume = %s.volume, "{err:#}");
            }
        }
        if let Some(epoch) = s.epoch {
            match admin.volume(&s.volume).await {
                Ok(v) if v.epoch.0 == epoch => {
                    let req = DetachVolume { name: s.volume.clone(), epoch: Some(Epoch(epoch)) };
                    match admin.detach(&req).await {
                        Ok(()) => tracing::info!(volume = %s.volume, epoch, "released the old attachment"),
                        Err(err) => tracing::warn!(volume = %s.volume, "releasing the old attachment: {err}"),
                    }
                }
                Ok(_) => tracing::info!(volume = %s.volume, "attached elsewhere since: nothing to release"),
                Err(err) => tracing::warn!(volume = %s.volume, "looking up the old attachment: {err}"),
            }
        }
        let _ = std::fs::remove_file(dir.join(STATE));
        cleaned.push(s.volume);
    }
    cleaned
}
