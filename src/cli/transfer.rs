//! `ballast volume import|export`: a raw image into or out of a volume,
//! through the same attachment and client path as `ballast attach`.
//!
//! **Sparse both ways.** Export asks the cluster where the volume's blocks
//! are (block status, as an NBD client would) and reads only those; reads
//! may still answer holes, which are skipped too. Into a regular file, holes
//! stay holes (positional writes, then `set_len`); into a pipe or a device
//! they are written as zeros. Import reads the image in 1 MiB pieces and
//! writes only the 4 KiB blocks that hold a non-zero byte; all-zero blocks
//! are skipped on a volume it created (`--size`: every block is a hole
//! already) and trimmed on an existing one, so the volume reads back as the
//! image and a sparse image stays sparse.
//!
//! **Attachment.** Import attaches read-write (a new epoch; `--force` fences
//! a live writer), export read-only; both detach at the end, also after a
//! failure or Ctrl-C. Bytes of an existing volume past the image's end are
//! left as they were.
//!
//! **Memory.** At most `--parallel` pieces of 1 MiB are in flight (read from
//! the input or waiting to be written out), never the whole image.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use ballast_client::{AdminClient, ClientConfig, ClusterExports, RemoteVolume};
use ballast_nbd::{BlockDevice, ExportProvider, ReadSegment};
use ballast_types::{format_size, CreateVolume, BLOCK_SIZE};
use bytes::{Bytes, BytesMut};
use futures::TryStreamExt;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::admin::{ConnArgs, DEFAULT_POOL};
use super::signals::Signals;
use super::{parse_name, parse_volume_size, UsageError};

/// Bytes per read or write request.
const PIECE: usize = 1 << 20;
/// Longest range one block-status call asks about (the client answers at
/// most 16 chunks of it).
const STATUS_SPAN: u64 = 1 << 30;

#[derive(clap::Args)]
pub struct ImportArgs {
    /// The volume to write the image into.
    #[arg(value_parser = parse_name)]
    pub volume: String,
    /// Raw image to read; `-` reads standard input.
    #[arg(value_name = "FILE|-")]
    pub file: PathBuf,
    /// Create the volume with this size first (at least the image's size);
    /// without it the volume must exist and be large enough.
    #[arg(long, value_parser = parse_volume_size)]
    pub size: Option<u64>,
    /// Pool of the volume `--size` creates.
    #[arg(long, default_value = DEFAULT_POOL, value_parser = parse_name, requires = "size")]
    pub pool: String,
    /// Take the volume over from a live writer, which gets fenced.
    #[arg(long)]
    pub force: bool,
    #[command(flatten)]
    pub transfer: TransferArgs,
    #[command(flatten)]
    pub conn: ConnArgs,
}

#[derive(clap::Args)]
pub struct ExportArgs {
    /// The volume to read.
    #[arg(value_parser = parse_name)]
    pub volume: String,
    /// Where to write the raw image (created or truncated); `-` writes to
    /// standard output.
    #[arg(value_name = "FILE|-")]
    pub file: PathBuf,
    #[command(flatten)]
    pub transfer: TransferArgs,
    #[command(flatten)]
    pub conn: ConnArgs,
}

#[derive(clap::Args)]
pub struct TransferArgs {
    /// Requests of 1 MiB in flight.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub parallel: u32,
    /// No progress bar (there is none anyway when stderr is not a terminal).
    #[arg(long)]
    pub no_progress: bool,
}

fn is_stdio(p: &Path) -> bool {
    p.as_os_str() == "-"
}

/// What a transfer did, for the final line.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Totals {
    /// Bytes of the image covered (data and holes).
    bytes: u64,
    /// Of those, bytes not sent: holes on export, zero blocks on import.
    skipped: u64,
}

pub async fn import(args: ImportArgs) -> Result<()> {
    let (input, image_len) = open_input(&args.file).await?;
    if let (Some(size), Some(len)) = (args.size, image_len) {
        if size < len {
            return Err(UsageError(format!(
                "--size {} is smaller than the image {} ({len} bytes)",
                format_size(size),
                args.file.display()
            ))
            .into());
        }
    }
    let mut signals = Signals::install()?;
    let config = ClientConfig::default();
    let admin = args.conn.admin(config)?;
    let (info, created) = match args.size {
        Some(size) => {
            let req = CreateVolume { name: args.volume.clone(), size, pool: args.pool.clone() };
            (admin.create_volume(&req).await?, true)
        }
        None => (admin.volume(&args.volume).await?, false),
    };
    if let Some(len) = image_len.filter(|l| *l > info.size) {
        bail!(
            "the image {} ({len} bytes) is larger than volume {:?} ({} bytes): grow the volume with \
             `ballast volume resize` or import into a new one with --size",
            args.file.display(),
            args.volume,
            info.size
        );
    }
    let (exports, device) = attach(admin, &args.volume, false, args.force, config).await?;
    let progress = progress_bar(image_len, args.transfer.no_progress);
    let started = Instant::now();
    let work = write_image(&device, input, info.size, !created, args.transfer.parallel as usize, &progress);
    let result = tokio::select! {
        r = work => r,
        () = signals.recv() => Err(anyhow!("interrupted: volume {:?} holds part of the image", args.volume)),
    };
    progress.finish_and_clear();
    let detached = exports.detach_all().await.context("detaching");
    let totals = result?;
    detached?;
    eprintln!("{}", summary("imported", &args.volume, totals, started.elapsed(), "zero blocks"));
    Ok(())
}

pub async fn export(args: ExportArgs) -> Result<()> {
    let mut signals = Signals::install()?;
    let config = ClientConfig::default();
    let admin = args.conn.admin(config)?;
    // Refused before the output file is touched.
    admin.volume(&args.volume).await?;
    let mut output = open_output(&args.file).await?;
    let (exports, device) = attach(admin, &args.volume, true, false, config).await?;
    let size = device.size();
    let progress = progress_bar(Some(size), args.transfer.no_progress);
    let started = Instant::now();
    let work = read_image(&device, &mut output, args.transfer.parallel as usize, &progress);
    let result = tokio::select! {
        r = work => r,
        () = signals.recv() => Err(anyhow!("interrupted: {} holds part of the image", args.file.display())),
    };
    progress.finish_and_clear();
    let detached = exports.detach_all().await.context("detaching");
    let totals = result?;
    detached?;
    eprintln!("{}", summary("exported", &args.volume, totals, started.elapsed(), "holes"));
    Ok(())
}

/// Attach `name` as `ballast attach` does and open it as a device.
async fn attach(
    admin: AdminClient,
    name: &str,
    read_only: bool,
    force: bool,
    config: ClientConfig,
) -> Result<(Arc<ClusterExports>, Arc<RemoteVolume>)> {
    let exports = ClusterExports::attach_one(admin, name, read_only, force, config).await?;
    match exports.open(name).await {
        Ok(Some(device)) => Ok((exports, device)),
        other => {
            let _ = exports.detach_all().await;
            let why = match other {
                Err(e) => e.to_string(),
                _ => "not served".into(),
            };
            bail!("cannot open volume {name:?}: {why}")
        }
    }
}

/// The image to import, and its length when it is a regular file. A file
/// that cannot be opened is a bad argument (exit code 2).
async fn open_input(path: &Path) -> Result<(Box<dyn AsyncRead + Unpin + Send>, Option<u64>)> {
    if is_stdio(path) {
        return Ok((Box::new(tokio::io::stdin()), None));
    }
    let file =
        tokio::fs::File::open(path).await.map_err(|e| UsageError(format!("cannot read {}: {e}", path.display())))?;
    let meta = file.metadata().await.with_context(|| format!("reading {}", path.display()))?;
    if meta.is_dir() {
        return Err(UsageError(format!("{} is a directory, not an image", path.display())).into());
    }
    let len = meta.is_file().then_some(meta.len());
    Ok((Box::new(file), len))
}

/// Where an export goes. A regular file keeps holes as holes; standard
/// output, pipes and devices get zeros.
enum Output {
    Sparse(Arc<std::fs::File>, PathBuf),
    Stream(Box<dyn AsyncWrite + Unpin + Send>),
}

async fn open_output(path: &Path) -> Result<Output> {
    if is_stdio(path) {
        return Ok(Output::Stream(Box::new(tokio::io::stdout())));
    }
    let p = path.to_path_buf();
    let opened = tokio::task::spawn_blocking(move || -> std::io::Result<(std::fs::File, bool)> {
        // Truncate only a regular file: a device keeps its size.
        let regular = std::fs::metadata(&p).map(|m| m.is_file()).unwrap_or(true);
        let file = std::fs::OpenOptions::new().write(true).create(true).truncate(regular).open(&p)?;
        Ok((file, regular))
    })
    .await?;
    match opened {
        Ok((file, true)) => Ok(Output::Sparse(Arc::new(file), path.to_path_buf())),
        Ok((file, false)) => Ok(Output::Stream(Box::new(tokio::fs::File::from_std(file)))),
        Err(e) => Err(UsageError(format!("cannot write {}: {e}", path.display())).into()),
    }
}

/// A bar on stderr when it is a terminal (and not turned off), else nothing.
fn progress_bar(total: Option<u64>, off: bool) -> ProgressBar {
    if off || !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let (bar, template) = match total {
        Some(t) => {
            (ProgressBar::new(t), "{binary_bytes}/{binary_total_bytes} [{wide_bar}] {binary_bytes_per_sec}, {eta} left")
        }
        None => (ProgressBar::no_length(), "{spinner} {binary_bytes} {binary_bytes_per_sec}"),
    };
    if let Ok(style) = ProgressStyle::with_template(template) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_draw_target(ProgressDrawTarget::stderr());
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

fn summary(what: &str, volume: &str, t: Totals, took: Duration, skipped: &str) -> String {
    let secs = took.as_secs_f64().max(1e-3);
    format!(
        "{what} {} ({} bytes) {} volume {volume:?} in {secs:.1} s: {:.1} MiB/s; {} of {skipped} skipped",
        format_size(t.bytes),
        t.bytes,
        if what == "imported" { "into" } else { "from" },
        t.bytes as f64 / secs / (1u64 << 20) as f64,
        format_size(t.skipped),
    )
}

// ----- import -----

/// Read up to `PIECE` bytes; fewer only at the end of the input.
async fn read_piece(input: &mut (dyn AsyncRead + Unpin + Send)) -> std::io::Result<Bytes> {
    let mut buf = BytesMut::with_capacity(PIECE);
    while buf.len() < PIECE {
        if input.read_buf(&mut buf).await? == 0 {
            break;
        }
    }
    Ok(buf.freeze())
}

/// Write the image from `input` at offset 0, `parallel` pieces at a time.
/// Zero blocks are trimmed when `trim_zeros` (the volume may hold data
/// there), else skipped.
async fn write_image(
    device: &RemoteVolume,
    input: Box<dyn AsyncRead + Unpin + Send>,
    volume_size: u64,
    trim_zeros: bool,
    parallel: usize,
    progress: &ProgressBar,
) -> Result<Totals> {
    let pieces = futures::stream::try_unfold((input, 0u64), |(mut input, offset)| async move {
        let data = read_piece(&mut *input).await.context("reading the image")?;
        if data.is_empty() {
            return Ok(None);
        }
        let end = offset + data.len() as u64;
        if end > volume_size {
            bail!("the image is larger than the volume ({volume_size} bytes): it does not fit");
        }
        Ok(Some(((offset, data), (input, end))))
    });
    pieces
        .map_ok(|(offset, data)| write_piece(device, offset, data, trim_zeros))
        .try_buffer_unordered(parallel)
        .try_fold(Totals::default(), |mut t, piece| {
            t.bytes += piece.bytes;
            t.skipped += piece.skipped;
            progress.inc(piece.bytes);
            futures::future::ready(Ok(t))
        })
        .await
}

/// Runs of 4 KiB blocks of `data` that are all zeros or not: `(start, end,
/// zero)` byte ranges covering `data` in order (the last block may be short).
fn zero_runs(data: &[u8]) -> Vec<(usize, usize, bool)> {
    let mut runs: Vec<(usize, usize, bool)> = Vec::new();
    for (i, block) in data.chunks(BLOCK_SIZE as usize).enumerate() {
        let start = i * BLOCK_SIZE as usize;
        let zero = is_zero(block);
        match runs.last_mut() {
            Some(last) if last.2 == zero => last.1 = start + block.len(),
            _ => runs.push((start, start + block.len(), zero)),
        }
    }
    runs
}

fn is_zero(block: &[u8]) -> bool {
    let mut words = block.chunks_exact(16);
    words.all(|w| u128::from_ne_bytes(w.try_into().unwrap_or([1; 16])) == 0)
        && words.remainder().iter().all(|b| *b == 0)
}

async fn write_piece(device: &RemoteVolume, offset: u64, data: Bytes, trim_zeros: bool) -> Result<Totals> {
    let mut t = Totals { bytes: data.len() as u64, skipped: 0 };
    for (start, end, zero) in zero_runs(&data) {
        let at = offset + start as u64;
        let len = end - start;
        if zero {
            t.skipped += len as u64;
            if trim_zeros {
                device
                    .write_zeroes(at, len as u32, true, false, false)
                    .await
                    .with_context(|| format!("zeroing {len} bytes at {at}"))?;
            }
        } else {
            device.write(at, data.slice(start..end), false).await.with_context(|| format!("writing at {at}"))?;
        }
    }
    Ok(t)
}

// ----- export -----

/// A range of the volume to copy out: read it, or a hole to skip.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Piece {
    Read { offset: u64, len: u32 },
    Hole { offset: u64, len: u64 },
}

/// Cut the extents block status reported from `offset` into pieces: holes
/// whole, data in reads of at most `PIECE` bytes.
fn pieces_of(offset: u64, extents: &[ballast_nbd::Extent]) -> Vec<Piece> {
    let mut out = Vec::new();
    let mut at = offset;
    for e in extents {
        let len = e.len as u64;
        if e.hole {
            out.push(Piece::Hole { offset: at, len });
        } else {
            let mut o = at;
            while o < at + len {
                let n = (at + len - o).min(PIECE as u64);
                out.push(Piece::Read { offset: o, len: n as u32 });
                o += n;
            }
        }
        at += len;
    }
    out
}

/// Copy the whole volume to `output` in order, `parallel` reads at a time.
async fn read_image(
    device: &RemoteVolume,
    output: &mut Output,
    parallel: usize,
    progress: &ProgressBar,
) -> Result<Totals> {
    let size = device.size();
    let pieces = futures::stream::try_unfold(0u64, |offset| async move {
        if offset >= size {
            return Ok::<_, anyhow::Error>(None);
        }
        let len = (size - offset).min(STATUS_SPAN) as u32;
        let extents = device.block_status(offset, len).await.with_context(|| format!("block status at {offset}"))?;
        let covered: u64 = extents.iter().map(|e| e.len as u64).sum::<u64>().min(size - offset);
        if covered == 0 {
            bail!("block status at {offset} covered nothing");
        }
        Ok(Some((
            futures::stream::iter(pieces_of(offset, &extents).into_iter().map(Ok::<Piece, anyhow::Error>)),
            offset + covered,
        )))
    });
    let filled = pieces
        .try_flatten()
        .map_ok(|piece| async move {
            match piece {
                Piece::Hole { .. } => Ok((piece, Vec::new())),
                Piece::Read { offset, len } => {
                    let segments = device.read(offset, len).await.with_context(|| format!("reading at {offset}"))?;
                    Ok((piece, segments))
                }
            }
        })
        .try_buffered(parallel);
    let mut filled = std::pin::pin!(filled);
    let mut t = Totals::default();
    while let Some((piece, segments)) = filled.try_next().await? {
        let (mut at, len) = match piece {
            Piece::Hole { offset, len } => {
                output.hole(offset, len).await?;
                t.skipped += len;
                t.bytes += len;
                progress.inc(len);
                continue;
            }
            Piece::Read { offset, len } => (offset, len as u64),
        };
        for seg in segments {
            match seg {
                ReadSegment::Data(data) => {
                    let n = data.len() as u64;
                    output.data(at, data).await?;
                    at += n;
                }
                ReadSegment::Hole(n) => {
                    output.hole(at, n as u64).await?;
                    t.skipped += n as u64;
                    at += n as u64;
                }
            }
        }
        t.bytes += len;
        progress.inc(len);
    }
    output.finish(size).await?;
    Ok(t)
}

impl Output {
    async fn data(&mut self, offset: u64, data: Bytes) -> Result<()> {
        match self {
            Output::Sparse(file, path) => {
                let file = file.clone();
                tokio::task::spawn_blocking(move || {
                    use std::os::unix::fs::FileExt;
                    file.write_all_at(&data, offset)
                })
                .await?
                .with_context(|| format!("writing {}", path.display()))
            }
            Output::Stream(w) => w.write_all(&data).await.context("writing the image"),
        }
    }

    /// `len` bytes of zeros at `offset`: skipped in a sparse file.
    async fn hole(&mut self, _offset: u64, len: u64) -> Result<()> {
        match self {
            Output::Sparse(..) => Ok(()),
            Output::Stream(w) => {
                static ZEROS: [u8; 64 << 10] = [0; 64 << 10];
                let mut left = len;
                while left > 0 {
                    let n = left.min(ZEROS.len() as u64) as usize;
                    w.write_all(&ZEROS[..n]).await.context("writing the image")?;
                    left -= n as u64;
                }
                Ok(())
            }
        }
    }

    /// Give a sparse file the volume's size (a trailing hole) and make it durable.
    async fn finish(&mut self, size: u64) -> Result<()> {
        match self {
            Output::Sparse(file, path) => {
                let file = file.clone();
                tokio::task::spawn_blocking(move || {
                    file.set_len(size)?;
                    file.sync_all()
                })
                .await?
                .with_context(|| format!("finishing {}", path.display()))
            }
            Output::Stream(w) => w.flush().await.context("writing the image"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ballast_nbd::Extent;

    #[test]
    fn zero_runs_cover_the_piece_and_split_at_blocks() {
        let mut data = vec![0u8; 5 * 4096 + 100];
        data[4096 + 7] = 1; // block 1
        data[2 * 4096] = 9; // block 2
        data[5 * 4096 + 99] = 3; // the short tail
        assert_eq!(
            zero_runs(&data),
            vec![
                (0, 4096, true),
                (4096, 3 * 4096, false),
                (3 * 4096, 5 * 4096, true),
                (5 * 4096, 5 * 4096 + 100, false)
            ]
        );
        assert_eq!(zero_runs(&[0u8; 10]), vec![(0, 10, true)]);
        assert!(zero_runs(&[]).is_empty());
        assert!(!is_zero(&[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]));
    }

    #[test]
    fn extents_become_whole_holes_and_bounded_reads() {
        let e = |len: u32, hole: bool| Extent { len, hole, zero: hole };
        let got = pieces_of(4096, &[e(8192, true), e(PIECE as u32 * 2 + 4096, false), e(4096, true)]);
        let base = 4096 + 8192;
        assert_eq!(
            got,
            vec![
                Piece::Hole { offset: 4096, len: 8192 },
                Piece::Read { offset: base, len: PIECE as u32 },
                Piece::Read { offset: base + PIECE as u64, len: PIECE as u32 },
                Piece::Read { offset: base + 2 * PIECE as u64, len: 4096 },
                Piece::Hole { offset: base + 2 * PIECE as u64 + 4096, len: 4096 },
            ]
        );
    }

    #[test]
    fn the_summary_names_size_speed_and_what_was_skipped() {
        let t = Totals { bytes: 1 << 30, skipped: 768 << 20 };
        let s = summary("imported", "vol", t, Duration::from_secs(4), "zero blocks");
        assert!(s.starts_with("imported 1 GiB (1073741824 bytes) into volume \"vol\" in 4.0 s: 256.0 MiB/s;"), "{s}");
        assert!(s.ends_with("768 MiB of zero blocks skipped"), "{s}");
    }
}
