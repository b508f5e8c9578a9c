//! Real-client workloads shared by the end-to-end tests: fio's nbd engine
//! with verification, and the attach path a host without the kernel nbd
//! module uses (nbdfuse → losetup → ext4).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use super::*;

const MIB: u64 = 1 << 20;
const SHORT: Duration = Duration::from_secs(60);
const LONG: Duration = Duration::from_secs(300);

pub struct FioResult {
    pub read_bytes: u64,
    pub write_bytes: u64,
    pub elapsed: Duration,
}

pub fn run_fio(fio: &Path, uri: &str, args: &[String], timeout: Duration) -> FioResult {
    let mut c = cmd(fio, ["--ioengine=nbd", &format!("--uri={uri}"), "--output-format=json"]);
    c.args(args);
    let out = run(&mut c, timeout);
    let all = out.all();
    for bad in ["verify: bad", "verify failed", "bad magic", "crc32c: verify", "fio: pid", "io_u error", "verify_fatal"]
    {
        let hit = all.lines().find(|l| l.contains(bad) && !l.contains("\"verify_fatal\""));
        assert!(hit.is_none(), "fio reported {bad:?}: {hit:?}\n{}", out.describe());
    }
    // The nbd engine prints a line before the JSON document.
    let json = &out.stdout[out.stdout.find('{').unwrap_or_else(|| panic!("no JSON from fio\n{}", out.describe()))..];
    let m = flatten_json(json);
    let njobs: usize = m["jobs.len"].parse().unwrap();
    let (mut r, mut w) = (0u64, 0u64);
    for j in 0..njobs {
        let f = |k: &str| m.get(&format!("jobs.{j}.{k}")).unwrap_or_else(|| panic!("fio JSON lacks jobs.{j}.{k}"));
        assert_eq!(f("error"), "0", "fio job {j} reported an error\n{}", out.describe());
        r += f("read.io_bytes").parse::<u64>().unwrap();
        w += f("write.io_bytes").parse::<u64>().unwrap();
        assert_eq!(f("read.short_ios"), "0", "short reads");
        assert_eq!(f("write.short_ios"), "0", "short writes");
    }
    assert!(w + r > 0, "fio did no I/O?\n{}", out.describe());
    FioResult { read_bytes: r, write_bytes: w, elapsed: out.elapsed }
}

/// Everything the attach path set up, torn down in reverse on drop (even when
/// the test fails half-way), so loops and fuse mounts never leak.
pub struct Attach {
    fuse_dir: PathBuf,
    fuse: Option<Child>,
    loop_dev: Option<String>,
    mounted: Option<PathBuf>,
}

impl Attach {
    /// `nbdfuse FUSE_DIR/disk URI` in the background, then `losetup` on the file.
    pub fn new(fuse_dir: &Path, uri: &str, log: &Path) -> Self {
        let nbdfuse = require_tool("nbdfuse", "libnbd-bin");
        let losetup = require_tool("losetup", "mount");
        std::fs::create_dir_all(fuse_dir).unwrap();
        let pidfile = fuse_dir.with_extension("pid");
        let _ = std::fs::remove_file(&pidfile);
        let logf = File::create(log).unwrap();
        let file = fuse_dir.join("disk");
        let mut c = Command::new(&nbdfuse);
        c.args(["-P", pidfile.to_str().unwrap(), file.to_str().unwrap(), uri]);
        let line = cmdline(&c);
        let child = c
            .stdin(Stdio::null())
            .stdout(logf.try_clone().unwrap())
            .stderr(logf)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn `{line}`: {e}"));
        let mut a = Attach { fuse_dir: fuse_dir.to_path_buf(), fuse: Some(child), loop_dev: None, mounted: None };
        let start = Instant::now();
        loop {
            if pidfile.exists() && file.exists() {
                break;
            }
            if let Some(st) = a.fuse.as_mut().unwrap().try_wait().unwrap() {
                panic!("`{line}` exited early with {st}: {}", std::fs::read_to_string(log).unwrap_or_default());
            }
            assert!(start.elapsed() < SHORT, "`{line}` did not create {} in time", file.display());
            std::thread::sleep(Duration::from_millis(50));
        }
        let len = std::fs::metadata(&file).unwrap().len();
        let nbdinfo = require_tool("nbdinfo", "libnbd-bin");
        let want: u64 = run(&mut cmd(&nbdinfo, ["--size", uri]), SHORT).stdout.trim().parse().unwrap();
        assert_eq!(len, want, "size of the nbdfuse file");
        let out = run(&mut cmd(&losetup, ["--find", "--show", file.to_str().unwrap()]), SHORT);
        let dev = out.stdout.trim().to_string();
        assert!(dev.starts_with("/dev/loop"), "losetup printed {dev:?}\n{}", out.describe());
        eprintln!("[ballast-test] attached {} -> {dev}", file.display());
        a.loop_dev = Some(dev);
        a
    }

    pub fn dev(&self) -> &str {
        self.loop_dev.as_deref().unwrap()
    }

    pub fn mount(&mut self, at: &Path) {
        std::fs::create_dir_all(at).unwrap();
        run(&mut cmd(require_tool("mount", "mount"), [self.dev(), at.to_str().unwrap()]), SHORT);
        self.mounted = Some(at.to_path_buf());
    }

    pub fn umount(&mut self) {
        if let Some(at) = self.mounted.take() {
            run(&mut cmd(require_tool("umount", "mount"), [at.to_str().unwrap()]), SHORT);
        }
    }

    /// Tear down: unmount, detach the loop, unmount fuse, reap nbdfuse.
    /// `strict` panics on the first failure (normal path); the drop path
    /// tries everything, lazily if need be.
    pub fn detach(&mut self, strict: bool) {
        let try_run = |c: &mut Command| -> bool {
            let out = run_capture(c, SHORT);
            if !out.status.success() {
                if strict {
                    panic!("teardown step failed\n{}", out.describe());
                }
                eprintln!("[ballast-test] teardown step failed (continuing)\n{}", out.describe());
            }
            out.status.success()
        };
        let _ = Command::new("sync").status();
        if let Some(at) = self.mounted.take() {
            if !try_run(&mut cmd(require_tool("umount", "mount"), [at.as_os_str()])) {
                try_run(&mut cmd(require_tool("umount", "mount"), [std::ffi::OsStr::new("-l"), at.as_os_str()]));
            }
        }
        if let Some(dev) = self.loop_dev.take() {
            try_run(&mut cmd(require_tool("losetup", "mount"), ["-d", &dev]));
        }
        if let Some(mut child) = self.fuse.take() {
            // The loop driver lets go of the file asynchronously: retry.
            let mut ok = false;
            for _ in 0..50 {
                let out = run_capture(
                    &mut cmd(
                        require_tool("fusermount3", "fuse3"),
                        [std::ffi::OsStr::new("-u"), self.fuse_dir.as_os_str()],
                    ),
                    SHORT,
                );
                if out.status.success() {
                    ok = true;
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            if !ok {
                let _ = run_capture(
                    &mut cmd(
                        require_tool("fusermount3", "fuse3"),
                        [std::ffi::OsStr::new("-uz"), self.fuse_dir.as_os_str()],
                    ),
                    SHORT,
                );
            }
            // nbdfuse exits once unmounted.
            let start = Instant::now();
            let exited = loop {
                match child.try_wait() {
                    Ok(Some(st)) => break Some(st),
                    Ok(None) if start.elapsed() < Duration::from_secs(10) => {
                        std::thread::sleep(Duration::from_millis(50))
                    }
                    _ => break None,
                }
            };
            if exited.is_none() {
                let _ = child.kill();
                let _ = child.wait();
            }
            if strict {
                assert!(ok, "fusermount3 -u {} kept failing", self.fuse_dir.display());
                assert!(exited.is_some(), "nbdfuse did not exit after unmount");
            }
        }
    }
}

impl Drop for Attach {
    fn drop(&mut self) {
        self.detach(false);
    }
}

pub fn sha256(path: &Path) -> String {
    let out = run(&mut cmd("sha256sum", [path]), SHORT);
    out.stdout.split_whitespace().next().unwrap().to_string()
}

/// The userspace attach path, end to end: nbdfuse exposes `uri` as a file, a
/// loop device turns it into a block device, ext4 goes on it, files are
/// written; then a fresh nbdfuse + loop re-attach, `e2fsck -fn` is clean and
/// every file's checksum matches. Scratch space under `work`.
pub fn ext4_files_survive_reattach(uri: &str, work: &Path, seed: u64) {
    require_tool("nbdfuse", "libnbd-bin");
    require_tool("fusermount3", "fuse3");
    require_tool("losetup", "mount");
    let mkfs = require_tool("mkfs.ext4", "e2fsprogs");
    let e2fsck = require_tool("e2fsck", "e2fsprogs");
    require_tool("sha256sum", "coreutils");
    assert!(Path::new("/dev/fuse").exists(), "/dev/fuse is missing: load the fuse module (`modprobe fuse`)");
    let fuse_dir = work.join("fuse");
    let mnt = work.join("mnt");
    let log = work.join("nbdfuse.log");

    // Attach, make a filesystem, write files.
    let mut a = Attach::new(&fuse_dir, uri, &log);
    run(&mut cmd(&mkfs, ["-q", "-F", a.dev()]), LONG);
    a.mount(&mnt);
    let mut files: Vec<(PathBuf, u64)> = vec![
        (PathBuf::from("small.bin"), 1000),
        (PathBuf::from("block.bin"), 4096),
        (PathBuf::from("dir/odd.bin"), 123_457),
        (PathBuf::from("dir/sub/mid.bin"), 3 * MIB + 17),
        (PathBuf::from("big.bin"), 20 * MIB),
    ];
    let mut sums = Vec::new();
    for (i, (rel, len)) in files.iter().enumerate() {
        let p = mnt.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, random_bytes(seed.wrapping_add(i as u64), *len as usize)).unwrap();
        sums.push(sha256(&p));
    }
    std::fs::write(mnt.join("empty"), b"").unwrap();
    files.push((PathBuf::from("empty"), 0));
    sums.push(sha256(&mnt.join("empty")));
    a.detach(true);
    drop(a);

    // The files really went through NBD into Ballast: the export now has at
    // least their size in allocated (data) extents.
    let nbdinfo = require_tool("nbdinfo", "libnbd-bin");
    let totals = flatten_json(&run(&mut cmd(&nbdinfo, ["--map", "--totals", "--json", uri]), SHORT).stdout);
    let n: usize = totals["len"].parse().unwrap();
    let allocated: u64 = (0..n)
        .filter(|i| totals[&format!("{i}.type")].parse::<u32>().unwrap() & 1 == 0)
        .map(|i| totals[&format!("{i}.size")].parse::<u64>().unwrap())
        .sum();
    let file_bytes: u64 = files.iter().map(|(_, l)| l).sum();
    eprintln!("[ballast-test] after ext4 + files: {} MiB allocated in the export", allocated / MIB);
    assert!(
        allocated >= file_bytes,
        "only {allocated} bytes allocated in the export for {file_bytes} bytes of files: {totals:?}"
    );

    // Re-attach through a new nbdfuse and a new loop device.
    let mut a = Attach::new(&fuse_dir, uri, &log);
    let out = run(&mut cmd(&e2fsck, ["-f", "-n", a.dev()]), LONG);
    eprintln!("[ballast-test] e2fsck -fn:\n{}{}", out.stdout, out.stderr);
    a.mount(&mnt);
    for ((rel, len), want) in files.iter().zip(&sums) {
        let p = mnt.join(rel);
        assert_eq!(
            std::fs::metadata(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display())).len(),
            *len,
            "{}",
            rel.display()
        );
        assert_eq!(&sha256(&p), want, "sha256 of {} after re-attach", rel.display());
    }
    // Also compare the big file byte for byte (a sha mismatch would say less).
    let big = std::fs::read(mnt.join("big.bin")).unwrap();
    assert_same_bytes("big.bin after re-attach", &big, &random_bytes(seed.wrapping_add(4), (20 * MIB) as usize));
    a.umount();
    a.detach(true);
}
