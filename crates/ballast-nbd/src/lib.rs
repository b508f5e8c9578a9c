//! ballast-nbd: an NBD (Network Block Device) server over any [`BlockDevice`].
//!
//! The server speaks the fixed-newstyle handshake and the compact-header
//! transmission phase of the NBD protocol, with structured replies and the
//! `base:allocation` metadata context, so qemu, libnbd tools (`nbdinfo`,
//! `nbdcopy`, `nbdsh`), the Linux kernel client and fio can all use a Ballast
//! volume. It knows nothing of where blocks live: an [`ExportProvider`] maps
//! export names to devices.
//!
//! Layout:
//! - [`device`]: the contract the server is generic over.
//! - [`client`]: an asynchronous NBD client (handshake, pipelined requests),
//!   used by `ballast bench` to drive any NBD server.
//! - [`proto`]: wire constants and pure encoders/decoders (public so the
//!   codec benchmarks and other NBD tools reuse them).
//! - `handshake`: option haggling up to the chosen export.
//! - [`metrics`]: requests, bytes, errors and latency per command, in the
//!   process-wide `ballast-metrics` registry.
//! - `transmission`: the request/reply loop with many requests in flight.
//! - `server`: [`NbdServer`], accept loops and per-connection plumbing.

pub mod client;
pub mod device;
mod handshake;
pub mod metrics;
pub mod proto;
mod server;
mod transmission;

pub use device::{BlockDevice, DeviceError, DeviceErrorKind, ExportProvider, Extent, ReadSegment};
pub use server::NbdServer;

/// Tunables for every connection the server accepts.
///
/// The block sizes are only *advertised* (`NBD_INFO_BLOCK_SIZE`); the server
/// accepts requests of any alignment, but refuses payloads above `max_block`
/// so one request can never make it allocate more than that.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerConfig {
    /// Requests one connection may have in flight before the server stops
    /// reading from it (back-pressure instead of unbounded memory). Values
    /// below 1 are treated as 1.
    pub max_in_flight: usize,
    /// Advertised minimum block size (a power of two).
    pub min_block: u32,
    /// Advertised preferred block size (a power of two, `>= min_block`).
    pub preferred_block: u32,
    /// Largest read or write payload accepted, and advertised as such.
    pub max_block: u32,
    /// Payload bytes (write data and read results) one connection may hold in
    /// flight; a request that would exceed it waits. Raised to at least
    /// `max_block` so one maximal request always fits.
    pub max_in_flight_bytes: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            max_in_flight: 64,
            min_block: 512,
            preferred_block: 4096,
            max_block: 32 * 1024 * 1024,
            max_in_flight_bytes: 256 * 1024 * 1024,
        }
    }
}

/// Why a connection ended other than by a clean disconnect.
///
/// Device failures during transmission are *not* here: they are answered with
/// an errno and the connection stays up.
#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    /// The socket failed (reset, broken pipe, ...).
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    /// The peer closed the connection in the middle of a message.
    #[error("connection closed in the middle of {0}")]
    Truncated(&'static str),
    /// A message started with the wrong magic number; the stream cannot be
    /// resynchronised, so the connection is closed.
    #[error("bad {what} magic {got:#x}")]
    BadMagic { what: &'static str, got: u64 },
    /// The client set handshake flags we do not know (the spec says close).
    #[error("client flags {0:#x} contain unknown bits")]
    UnknownClientFlags(u32),
    /// An option announced more data than we are willing to even drain.
    #[error("option {opt} announced {len} bytes of data, over the limit")]
    OptionTooLarge { opt: u32, len: u32 },
    /// `NBD_OPT_EXPORT_NAME` named an export that is not valid UTF-8 or too long.
    #[error("malformed export name in NBD_OPT_EXPORT_NAME")]
    BadExportName,
    /// `NBD_OPT_EXPORT_NAME` named an export that does not exist; that option
    /// has no error reply, so the spec says close.
    #[error("client asked for unknown export {0:?}")]
    UnknownExport(String),
    /// The provider failed to open the export asked for with
    /// `NBD_OPT_EXPORT_NAME`.
    #[error("export {name:?} could not be opened: {source}")]
    Open {
        name: String,
        #[source]
        source: DeviceError,
    },
}

impl NbdError {
    /// Whether the peer broke the protocol (logged at warn) rather than the
    /// transport failing or the export being unavailable.
    pub fn is_protocol_violation(&self) -> bool {
        matches!(
            self,
            NbdError::Truncated(_)
                | NbdError::BadMagic { .. }
                | NbdError::UnknownClientFlags(_)
                | NbdError::OptionTooLarge { .. }
                | NbdError::BadExportName
        )
    }
}
