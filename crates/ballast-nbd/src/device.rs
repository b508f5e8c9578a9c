//! The block-device contract the NBD server is generic over.
//!
//! The server knows nothing of where blocks live: a local RocksDB volume, a
//! replicated volume reached through the thin client, or an in-memory device in
//! tests all implement [`BlockDevice`]. The server validates every request
//! (range, flags, read-only) *before* calling the device, so implementations may
//! assume `offset + len <= size()` and `len > 0` for every call.

use std::future::Future;
use std::sync::Arc;

use bytes::Bytes;

/// Why a device operation failed; the server maps each kind to the NBD error
/// the spec names.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeviceErrorKind {
    /// Stored data failed its checksum, or the backing store failed: `EIO`.
    #[error("I/O error")]
    Io,
    /// The request cannot be served as asked: `EINVAL`.
    #[error("invalid request")]
    Invalid,
    /// No space left (or a write past the end): `ENOSPC`.
    #[error("no space")]
    NoSpace,
    /// The export is read-only or the writer was fenced: `EPERM`.
    #[error("not permitted")]
    NotPermitted,
    /// The operation is not supported, or a `FAST_ZERO` cannot be fast: `ENOTSUP`.
    #[error("not supported")]
    NotSupported,
    /// The device is shutting down: `ESHUTDOWN`.
    #[error("shutting down")]
    Shutdown,
}

/// A failed device operation: a kind for the wire and a message for the log
/// (and for structured error replies).
#[derive(Debug, Clone, thiserror::Error)]
#[error("{kind}: {message}")]
pub struct DeviceError {
    pub kind: DeviceErrorKind,
    pub message: String,
}

impl DeviceError {
    pub fn new(kind: DeviceErrorKind, message: impl Into<String>) -> Self {
        Self { kind, message: message.into() }
    }
}

/// One piece of a read: bytes, or a run that reads as zeros and is not
/// allocated (the server may send it as `NBD_REPLY_TYPE_OFFSET_HOLE`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadSegment {
    Data(Bytes),
    Hole(u32),
}

impl ReadSegment {
    pub fn len(&self) -> u32 {
        match self {
            ReadSegment::Data(b) => b.len() as u32,
            ReadSegment::Hole(n) => *n,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One extent of `base:allocation` block status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub len: u32,
    /// Not allocated (`NBD_STATE_HOLE`).
    pub hole: bool,
    /// Reads as zeros (`NBD_STATE_ZERO`).
    pub zero: bool,
}

/// A block device served over NBD.
///
/// Contract (every implementation must keep it; the server relies on it):
/// - **Durability.** A write, trim or zero call with `fua == true` returns only
///   once its effect is on stable storage. [`BlockDevice::flush`] returns only
///   once every write *completed* before it was called — on any connection to
///   any handle of the same device — is on stable storage. That is what lets
///   the server advertise `NBD_FLAG_CAN_MULTI_CONN`.
/// - **Ordering.** Calls may run concurrently and complete in any order; the
///   device must keep each call atomic per 4 KiB block (no torn read-modify-write
///   between two concurrent sub-block writes to the same block).
/// - **Reads.** `read` returns segments whose lengths add up to `len` exactly.
/// - **Ranges.** The server calls only with `len > 0` and `offset + len <= size()`.
/// - **Who may call.** Only the NBD server (or tests) — any number of tasks.
pub trait BlockDevice: Send + Sync + 'static {
    /// Size in bytes, read at each handshake (so a grown volume shows on reconnect).
    fn size(&self) -> u64;

    /// Whether writes are refused (`NBD_FLAG_READ_ONLY`).
    fn read_only(&self) -> bool;

    /// Free-form text for `NBD_INFO_DESCRIPTION` when a client asks for it
    /// (e.g. `nbdinfo`); `None` (the default) sends no description.
    fn description(&self) -> Option<String> {
        None
    }

    fn read(&self, offset: u64, len: u32) -> impl Future<Output = Result<Vec<ReadSegment>, DeviceError>> + Send;

    fn write(&self, offset: u64, data: Bytes, fua: bool) -> impl Future<Output = Result<(), DeviceError>> + Send;

    /// Make `[offset, offset+len)` read as zeros. With `may_trim` the device may
    /// deallocate (punch a hole); without it (`NBD_CMD_FLAG_NO_HOLE`) the range
    /// must stay allocated. With `fast` (`NBD_CMD_FLAG_FAST_ZERO`) the device must
    /// fail with `NotSupported` rather than be slower than a write.
    fn write_zeroes(
        &self,
        offset: u64,
        len: u32,
        may_trim: bool,
        fast: bool,
        fua: bool,
    ) -> impl Future<Output = Result<(), DeviceError>> + Send;

    /// Discard the range: afterwards it reads as zeros in this implementation
    /// family (the NBD spec allows garbage; we promise zeros).
    fn trim(&self, offset: u64, len: u32, fua: bool) -> impl Future<Output = Result<(), DeviceError>> + Send;

    fn flush(&self) -> impl Future<Output = Result<(), DeviceError>> + Send;

    /// Advisory prefetch (`NBD_CMD_CACHE`); may do nothing.
    fn cache(&self, offset: u64, len: u32) -> impl Future<Output = Result<(), DeviceError>> + Send;

    /// `base:allocation` extents starting at `offset`, covering at most `len`
    /// bytes (at least one extent, lengths > 0, in order, contiguous).
    fn block_status(&self, offset: u64, len: u32) -> impl Future<Output = Result<Vec<Extent>, DeviceError>> + Send;
}

/// Where the server finds its exports by name.
///
/// `open` is called once per connection at `NBD_OPT_GO`/`EXPORT_NAME`; the
/// empty name is the default export (the spec's convention).
pub trait ExportProvider: Send + Sync + 'static {
    type Device: BlockDevice;

    /// Names and descriptions for `NBD_OPT_LIST`.
    fn list(&self) -> impl Future<Output = Result<Vec<(String, String)>, DeviceError>> + Send;

    /// The device for `name`, or `None` when there is no such export.
    fn open(&self, name: &str) -> impl Future<Output = Result<Option<Arc<Self::Device>>, DeviceError>> + Send;
}
