#!/usr/bin/python3
"""Exercise every NBD command and flag of a Ballast export through libnbd
(the library behind nbdsh), then speak raw NBD over a socket for the
malformed-request cases libnbd will not produce.

Usage: /usr/bin/python3 nbdsh_commands.py URI RO_URI

URI is a read-write export (at least 128 MiB, freshly created: all holes), RO_URI
a read-only one. Exits 0 on success; on the first failed check prints
"FAIL: <what>" (with a traceback) and exits 1.
"""

import errno
import os
import random
import socket
import struct
import sys
import time
import traceback
import urllib.parse

import nbd

URI, RO_URI = sys.argv[1], sys.argv[2]
SEED = int(os.environ.get("BALLAST_SEED", "0") or 0) or random.randrange(1, 1 << 62)
rng = random.Random(SEED)

KiB = 1024
MiB = 1024 * KiB
HOLE_ZERO = nbd.STATE_HOLE | nbd.STATE_ZERO


class CheckFailed(Exception):
    pass


def check(cond, what):
    if not cond:
        raise CheckFailed(what)


deferred = []


def check_later(cond, what):
    """A failed check that should not hide the checks after it: reported at the end."""
    if not cond:
        print(f"    DEFERRED FAILURE: {what}", flush=True)
        deferred.append(what)


def section(name):
    print(f"--- {name}", flush=True)


def rand_bytes(n):
    return rng.randbytes(n)


def expect_errno(what, want, fn, *args, **kw):
    """Run fn, which must fail with nbd.Error carrying errno `want`."""
    try:
        fn(*args, **kw)
    except nbd.Error as e:
        check(e.errnum == want,
              f"{what}: expected {errno.errorcode[want]}, got errnum={e.errnum} "
              f"({e.errno}): {e.string}")
        print(f"    {what}: {errno.errorcode[want]} as expected ({e.string})")
        return
    raise CheckFailed(f"{what}: succeeded, expected {errno.errorcode[want]}")


def first_diff(a, b):
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return min(len(a), len(b))


def check_bytes(what, got, want):
    got = bytes(got)
    if got != want:
        i = first_diff(got, want)
        raise CheckFailed(
            f"{what}: data mismatch (len {len(got)} vs {len(want)}), first difference at "
            f"+{i}: got {got[i:i + 8].hex()} want {want[i:i + 8].hex()}")


# ---- a local model of the export --------------------------------------------------

class Model:
    """Expected contents of the bytes this script touches (sparse, zero default)."""

    def __init__(self):
        self.data = {}  # offset -> bytes, non-overlapping runs written by us

    def write(self, off, buf):
        self._cut(off, len(buf))
        self.data[off] = bytes(buf)

    def zero(self, off, n):
        self.write(off, bytes(n))

    def _cut(self, off, n):
        end = off + n
        for o in list(self.data):
            b = self.data[o]
            oe = o + len(b)
            if oe <= off or o >= end:
                continue
            del self.data[o]
            if o < off:
                self.data[o] = b[:off - o]
            if oe > end:
                self.data[end] = b[end - o:]

    def read(self, off, n):
        out = bytearray(n)
        for o, b in self.data.items():
            lo, hi = max(o, off), min(o + len(b), off + n)
            if lo < hi:
                out[lo - off:hi - off] = b[lo - o:hi - o]
        return bytes(out)


model = Model()


def verify(h, off, n, what):
    check_bytes(f"{what}: pread({n}, {off})", h.pread(n, off), model.read(off, n))


# ---- structured-read and block-status helpers --------------------------------------

def structured_read(h, n, off, flags=0):
    """pread_structured, returning (buffer, chunks) after checking that the chunks
    tile [off, off+n) exactly, holes are zeros, and nothing is reported as an error."""
    chunks = []

    def cb(subbuf, coff, status, err):
        chunks.append((coff, len(subbuf), status, bytes(subbuf) if status == nbd.READ_HOLE else None))
        return 0

    buf = h.pread_structured(n, off, cb, flags)
    check(len(chunks) > 0, f"pread_structured({n}, {off}): no chunk callback at all")
    pos = off
    for coff, clen, status, hole in sorted(chunks):
        check(status in (nbd.READ_DATA, nbd.READ_HOLE),
              f"pread_structured({n}, {off}): unexpected chunk status {status}")
        check(clen > 0, f"pread_structured({n}, {off}): empty chunk at {coff}")
        check(coff == pos,
              f"pread_structured({n}, {off}): chunks do not tile the range: gap/overlap at {pos} "
              f"(next chunk at {coff}); chunks={sorted((c[0], c[1], c[2]) for c in chunks)}")
        if hole is not None:
            check(hole == bytes(clen), f"hole chunk at {coff} is not zeros")
        pos = coff + clen
    check(pos == off + n, f"pread_structured({n}, {off}): chunks end at {pos}, not {off + n}")
    return bytes(buf), [(c[0], c[1], c[2]) for c in sorted(chunks)]


def extents(h, n, off, flags=0):
    """block_status -> list of (offset, length, flags) for base:allocation."""
    got = []
    calls = []

    def cb(ctx, eoff, entries, err):
        calls.append(ctx)
        if ctx == nbd.CONTEXT_BASE_ALLOCATION:
            got.append((eoff, list(entries)))
        return 0

    h.block_status(n, off, cb, flags)
    check(calls == [nbd.CONTEXT_BASE_ALLOCATION],
          f"block_status({n}, {off}): expected one base:allocation callback, got {calls}")
    eoff, entries = got[0]
    check(eoff == off, f"block_status({n}, {off}): extents start at {eoff}")
    check(len(entries) >= 2 and len(entries) % 2 == 0, f"block_status: bad entries {entries}")
    out = []
    pos = off
    for i in range(0, len(entries), 2):
        ln, fl = entries[i], entries[i + 1]
        check(ln > 0, f"block_status({n}, {off}): zero-length extent in {entries}")
        check(fl & ~HOLE_ZERO == 0, f"block_status: unknown state bits {fl:#x}")
        out.append((pos, ln, fl))
        pos += ln
    return out


def clipped_map(h, n, off):
    """Extents over exactly [off, off+n), following up when the server returns
    less than asked, adjacent equal extents merged."""
    out = []
    pos = off
    while pos < off + n:
        ex = extents(h, off + n - pos, pos)
        for eo, el, ef in ex:
            el = min(el, off + n - eo)
            if el <= 0:
                break
            if out and out[-1][2] == ef and out[-1][0] + out[-1][1] == eo:
                out[-1] = (out[-1][0], out[-1][1] + el, ef)
            else:
                out.append((eo, el, ef))
        pos = out[-1][0] + out[-1][1]
    return out


def check_map(h, off, n, want, what):
    got = clipped_map(h, n, off)
    check(got == want, f"{what}: block status map over [{off}, {off + n})\n  got  {got}\n  want {want}")


# ---- libnbd sections ----------------------------------------------------------------

def connect(uri, structured=True):
    h = nbd.NBD()
    h.set_handle_name("ballast-e2e")
    if not structured:
        h.set_request_structured_replies(False)
    h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    h.connect_uri(uri)
    return h


def test_negotiation(h):
    section("negotiation and advertised flags")
    check(h.get_protocol() == "newstyle-fixed", f"protocol {h.get_protocol()}")
    check(h.get_structured_replies_negotiated(), "structured replies not negotiated")
    check(h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION), "base:allocation not negotiated")
    for name in ["can_flush", "can_fua", "can_trim", "can_zero", "can_fast_zero", "can_df",
                 "can_multi_conn", "can_cache"]:
        check(getattr(h, name)(), f"{name}() is false")
    check(not h.is_read_only(), "rw export reports read-only")
    check(h.get_block_size(nbd.SIZE_MINIMUM) == 512, "minimum block size")
    check(h.get_block_size(nbd.SIZE_PREFERRED) == 4096, "preferred block size")
    check(h.get_block_size(nbd.SIZE_MAXIMUM) == 32 * MiB, "maximum block size")
    size = h.get_size()
    check(size >= 128 * MiB and size % 4096 == 0, f"export size {size}")
    return size


def test_fresh_holes(h, base):
    section("a fresh export is holes that read as zeros")
    check_map(h, base, 4 * MiB, [(base, 4 * MiB, HOLE_ZERO)], "fresh export")
    verify(h, base, 1 * MiB, "fresh export")
    buf, chunks = structured_read(h, 1 * MiB, base)
    check(buf == bytes(MiB), "structured read of a hole is not zeros")
    check(all(st == nbd.READ_HOLE for _, _, st in chunks),
          f"structured read of an unallocated range should be sent as OFFSET_HOLE chunks, got {chunks}")


def test_writes_and_reads(h, base):
    section("pwrite (plain, FUA, unaligned) and pread")
    a = rand_bytes(256 * KiB)
    h.pwrite(a, base, nbd.CMD_FLAG_FUA)
    model.write(base, a)
    b = rand_bytes(128 * KiB)
    h.pwrite(b, base + 256 * KiB)
    model.write(base + 256 * KiB, b)
    verify(h, base, 1 * MiB, "after FUA and plain writes")
    # Unaligned: 1000 bytes at an odd offset inside written data, and across a
    # block boundary into a hole.
    u = rand_bytes(1000)
    h.pwrite(u, base + 513)
    model.write(base + 513, u)
    u2 = rand_bytes(3000)
    off2 = base + 384 * KiB - 1234  # straddles data -> hole at base+384K
    h.pwrite(u2, off2)
    model.write(off2, u2)
    verify(h, base, 512 * KiB, "after unaligned writes")
    # Unaligned reads of every shape.
    for off, n in [(base + 1, 1), (base + 511, 2), (base + 4095, 4098), (base + 100, 300 * KiB + 7),
                   (base + 384 * KiB - 5000, 10000)]:
        verify(h, off, n, "unaligned read")
    h.flush()
    verify(h, base, 512 * KiB, "after flush")


def test_structured_reads(h, base):
    section("pread_structured: OFFSET_DATA / OFFSET_HOLE chunks, DF")
    # [base, base+384K+1766) is data (see above), then holes to base+1M.
    n = 1 * MiB
    buf, chunks = structured_read(h, n, base)
    check_bytes("pread_structured contents", buf, model.read(base, n))
    data_end = max(o + ln for o, ln, st in chunks if st == nbd.READ_DATA)
    check(data_end >= base + 384 * KiB + 1766, f"data chunks end at {data_end - base}")
    check(any(st == nbd.READ_HOLE for _, _, st in chunks),
          f"no OFFSET_HOLE chunk for the unallocated tail: {chunks}")
    for o, ln, st in chunks:
        if st == nbd.READ_HOLE:
            check(o >= base + 384 * KiB, f"hole chunk at +{o - base} overlaps written data")
    # DF: at most one content chunk covering everything, even over data + holes.
    for off, n in [(base, 1 * MiB), (base + 1000, 5000), (base + 2 * MiB, 64 * KiB)]:
        buf, chunks = structured_read(h, n, off, nbd.CMD_FLAG_DF)
        check(len(chunks) == 1, f"DF read({n}, {off}) was fragmented into {len(chunks)} chunks: {chunks}")
        check_bytes("DF read contents", buf, model.read(off, n))
    # Plain pread with DF set (libnbd only allows it with strict mode off).
    check_bytes("pread with DF", h.pread(1 * MiB, base, nbd.CMD_FLAG_DF), model.read(base, 1 * MiB))


def test_trim(h, base):
    section("trim (plain, FUA, unaligned)")
    t = base + 4 * MiB
    d = rand_bytes(512 * KiB)
    h.pwrite(d, t)
    model.write(t, d)
    h.trim(64 * KiB, t + 64 * KiB)
    model.zero(t + 64 * KiB, 64 * KiB)
    h.trim(64 * KiB, t + 192 * KiB, nbd.CMD_FLAG_FUA)
    model.zero(t + 192 * KiB, 64 * KiB)
    verify(h, t, 512 * KiB, "after trims")
    check_map(h, t, 512 * KiB, [
        (t, 64 * KiB, 0),
        (t + 64 * KiB, 64 * KiB, HOLE_ZERO),
        (t + 128 * KiB, 64 * KiB, 0),
        (t + 192 * KiB, 64 * KiB, HOLE_ZERO),
        (t + 256 * KiB, 256 * KiB, 0),
    ], "after trims")
    # Unaligned trim: Ballast promises the trimmed bytes read as zeros.
    h.trim(4096 + 1000, t + 300 * KiB + 700)
    model.zero(t + 300 * KiB + 700, 4096 + 1000)
    verify(h, t, 512 * KiB, "after unaligned trim")


def test_zero(h, base):
    section("zero (plain, NO_HOLE, FAST_ZERO, FUA, unaligned)")
    z = base + 8 * MiB
    d = rand_bytes(1 * MiB)
    h.pwrite(d, z)
    model.write(z, d)
    h.zero(64 * KiB, z)  # may punch a hole
    model.zero(z, 64 * KiB)
    h.zero(64 * KiB, z + 128 * KiB, nbd.CMD_FLAG_NO_HOLE)
    model.zero(z + 128 * KiB, 64 * KiB)
    h.zero(64 * KiB, z + 256 * KiB, nbd.CMD_FLAG_FAST_ZERO)
    model.zero(z + 256 * KiB, 64 * KiB)
    h.zero(64 * KiB, z + 384 * KiB, nbd.CMD_FLAG_FUA | nbd.CMD_FLAG_NO_HOLE)
    model.zero(z + 384 * KiB, 64 * KiB)
    h.zero(64 * KiB, z + 512 * KiB, nbd.CMD_FLAG_FAST_ZERO | nbd.CMD_FLAG_NO_HOLE)
    model.zero(z + 512 * KiB, 64 * KiB)
    verify(h, z, 1 * MiB, "after write-zeroes")
    m = clipped_map(h, 1 * MiB, z)
    check(m[0] == (z, 64 * KiB, HOLE_ZERO), f"zero without NO_HOLE should deallocate: map {m}")

    def flags_at(off):
        for eo, el, ef in m:
            if eo <= off < eo + el:
                return ef
        raise CheckFailed(f"offset {off} not in map {m}")

    for off in (z + 128 * KiB, z + 384 * KiB, z + 512 * KiB):
        check(flags_at(off) & nbd.STATE_HOLE == 0,
              f"zero with NO_HOLE at +{off - z} must stay allocated: map {m}")
    check(flags_at(z + 256 * KiB) & nbd.STATE_ZERO or flags_at(z + 256 * KiB) == 0,
          f"FAST_ZERO range flags: map {m}")
    check(flags_at(z + 64 * KiB) == 0, f"untouched data reported as hole: map {m}")
    # Partial blocks: zeroed bytes read as zeros, neighbours intact.
    h.zero(5000, z + 700 * KiB + 123)
    model.zero(z + 700 * KiB + 123, 5000)
    h.zero(100, z + 800 * KiB + 4000, nbd.CMD_FLAG_NO_HOLE)
    model.zero(z + 800 * KiB + 4000, 100)
    verify(h, z, 1 * MiB, "after unaligned write-zeroes")


def test_cache(h, base):
    section("cache")
    h.cache(1 * MiB, base)
    h.cache(4096, base + 100 * MiB)
    verify(h, base, 1 * MiB, "after cache")


def test_block_status(h, base):
    section("block_status with and without REQ_ONE")
    s = base + 16 * MiB
    for i in (0, 2, 3):  # data, hole, data, data, hole...
        d = rand_bytes(64 * KiB)
        h.pwrite(d, s + i * 64 * KiB)
        model.write(s + i * 64 * KiB, d)
    want = [(s, 64 * KiB, 0), (s + 64 * KiB, 64 * KiB, HOLE_ZERO), (s + 128 * KiB, 128 * KiB, 0),
            (s + 256 * KiB, 768 * KiB, HOLE_ZERO)]
    check_map(h, s, 1 * MiB, want, "mixed region")
    # A whole-range answer: extents in order, covering at least part of the range.
    ex = extents(h, 1 * MiB, s)
    check(ex[0][2] == 0 and ex[0][1] <= 64 * KiB, f"first extent {ex[0]}")
    # REQ_ONE: exactly one extent, not longer than asked, right state.
    for off, n, fl, maxlen in [
        (s, 1 * MiB, 0, 64 * KiB),
        (s + 100, 1 * MiB, 0, 64 * KiB - 100),
        (s + 64 * KiB, 1 * MiB, HOLE_ZERO, 64 * KiB),
        (s + 64 * KiB + 512, 4096, HOLE_ZERO, 4096),
        (s + 128 * KiB, 32 * KiB, 0, 32 * KiB),
        (s + 256 * KiB, 64 * MiB, HOLE_ZERO, 64 * MiB),
    ]:
        ex = extents(h, n, off, nbd.CMD_FLAG_REQ_ONE)
        check(len(ex) == 1, f"REQ_ONE block_status({n}, {off}) returned {len(ex)} extents: {ex}")
        check(ex[0][2] == fl, f"REQ_ONE at +{off - s}: flags {ex[0][2]} want {fl}")
        check(0 < ex[0][1] <= min(n, maxlen), f"REQ_ONE at +{off - s}: length {ex[0][1]} > {min(n, maxlen)}")
    # Up to the very end of the export.
    size = h.get_size()
    ex = extents(h, 4096, size - 4096)
    check(sum(e[1] for e in ex) == 4096, f"block status of the last block: {ex}")
    ex = extents(h, 4096, size - 4096, nbd.CMD_FLAG_REQ_ONE)
    check(len(ex) == 1 and ex[0][1] == 4096, f"REQ_ONE block status of the last block: {ex}")


def drain(h, what):
    deadline = time.time() + 30
    while h.aio_in_flight() > 0:
        check(time.time() < deadline, f"{what} did not complete in 30 s ({h.aio_in_flight()} in flight)")
        h.poll(1000)


def test_many_in_flight(h, base):
    section("64 concurrent aio requests (out-of-order replies)")
    a = base + 32 * MiB
    bufs = []
    cookies = []
    for i in range(64):
        d = rand_bytes(4096 + (i % 7) * 512)
        off = a + i * 16 * KiB + (i % 3) * 512
        bufs.append((off, d))
        model.write(off, d)
        cookies.append(h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(d)), off, flags=nbd.CMD_FLAG_FUA if i % 8 == 0 else 0))
    drain(h, "aio writes")
    for c in cookies:
        check(h.aio_command_completed(c), f"aio write {c} not completed")
    reads = []
    for off, d in bufs:
        b = nbd.Buffer(len(d))
        reads.append((off, d, b, h.aio_pread(b, off)))
    drain(h, "aio reads")
    for r in reads:
        check(h.aio_command_completed(r[3]), f"aio read {r[3]} not completed")
    for off, d, b, _ in reads:
        check_bytes(f"aio read at {off}", b.to_bytearray(), d)
    verify(h, a, 1 * MiB + 64 * KiB, "after aio")


def test_two_connections_same_blocks(uri, base):
    section("two connections writing interleaved 512-byte sectors of the same blocks")
    h1, h2 = connect(uri), connect(uri)
    c = base + 48 * MiB
    nblocks = 256
    for rnd in range(4):
        pending = []
        for b in range(nblocks):
            for sec in range(8):
                off = c + b * 4096 + sec * 512
                d = rand_bytes(512)
                model.write(off, d)
                h = h1 if sec % 2 == 0 else h2
                pending.append(h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(d)), off))
            if len(pending) >= 256:
                drain(h1, "sector writes")
                drain(h2, "sector writes")
                pending = []
        drain(h1, "sector writes")
        drain(h2, "sector writes")
        for h in (h1, h2):
            verify(h, c, nblocks * 4096, f"interleaved sector writes, round {rnd} (lost update?)")
    h1.shutdown()
    h2.shutdown()


def test_max_block(h, base):
    section("payload size limits")
    big = h.pread(32 * MiB, base)
    check_bytes("32 MiB read (max block)", big, model.read(base, 32 * MiB))
    try:
        h.pread(32 * MiB + 4096, base)
    except nbd.Error as e:
        check(e.errnum in (errno.EINVAL, errno.EOVERFLOW, errno.ENOMEM, errno.ERANGE),
              f"oversized read: unexpected error {e}")
        print(f"    read over max block refused: {e}")
    else:
        print("    read over max block was served (server accepts it)")
    verify(h, base, 4096, "after oversized read")


def test_errors(h, base, size):
    section("errors keep the connection usable")
    ok = lambda: verify(h, base, 64 * KiB, "pread after an error")  # noqa: E731
    expect_errno("pread past end", errno.EINVAL, h.pread, 4096, size)
    ok()
    expect_errno("pread straddling end", errno.EINVAL, h.pread, 8192, size - 4096)
    ok()
    expect_errno("pread_structured past end", errno.EINVAL, h.pread_structured, 4096, size + 4096,
                 lambda *a: 0)
    ok()
    expect_errno("pwrite past end", errno.ENOSPC, h.pwrite, bytes(4096), size)
    ok()
    expect_errno("pwrite straddling end", errno.ENOSPC, h.pwrite, bytes(8192), size - 4096)
    ok()
    expect_errno("zero past end", errno.ENOSPC, h.zero, 4096, size)
    ok()
    expect_errno("trim past end", errno.EINVAL, h.trim, 4096, size)
    ok()
    expect_errno("cache past end", errno.EINVAL, h.cache, 4096, size)
    ok()
    expect_errno("block_status past end", errno.EINVAL, h.block_status, 4096, size, lambda *a: 0)
    ok()
    expect_errno("pread with an offset near 2^64", errno.EINVAL, h.pread, 4096, (1 << 64) - 2048)
    ok()
    expect_errno("pread with an unknown command flag", errno.EINVAL, h.pread, 4096, base, 1 << 7)
    ok()
    # The end block itself is still fine.
    d = rand_bytes(4096)
    h.pwrite(d, size - 4096, nbd.CMD_FLAG_FUA)
    model.write(size - 4096, d)
    verify(h, size - 4096, 4096, "last block")
    # Zero-length requests: the spec leaves them undefined; either answer is
    # fine, but the connection must survive.
    for name, fn in [("pread", lambda: h.pread(0, base)), ("pwrite", lambda: h.pwrite(b"", base)),
                     ("trim", lambda: h.trim(0, base)), ("zero", lambda: h.zero(0, base))]:
        try:
            fn()
            print(f"    zero-length {name}: accepted")
        except nbd.Error as e:
            print(f"    zero-length {name}: refused ({e})")
        ok()
    check(h.aio_in_flight() == 0, "requests still in flight")


def test_read_only(ro_uri):
    section("read-only export refuses writes with EPERM")
    r = connect(ro_uri)
    r.set_strict_mode(0)
    check(r.is_read_only(), "ro export is not read-only")
    size = r.get_size()
    check(r.pread(64 * KiB, 0) == bytes(64 * KiB), "ro export does not read zeros")
    ok = lambda: check(r.pread(4096, 4096) == bytes(4096), "ro pread after an error")  # noqa: E731
    expect_errno("pwrite on ro", errno.EPERM, r.pwrite, b"x" * 4096, 0)
    ok()
    expect_errno("pwrite FUA on ro", errno.EPERM, r.pwrite, b"x" * 512, 512, nbd.CMD_FLAG_FUA)
    ok()
    expect_errno("trim on ro", errno.EPERM, r.trim, 4096, 0)
    ok()
    expect_errno("zero on ro", errno.EPERM, r.zero, 4096, 0)
    ok()
    expect_errno("zero NO_HOLE on ro", errno.EPERM, r.zero, 4096, 0, nbd.CMD_FLAG_NO_HOLE)
    ok()
    ex = extents(r, 1 * MiB, 0)
    check(ex[0][2] == HOLE_ZERO, f"ro export block status {ex}")
    check(r.pread(4096, size - 4096) == bytes(4096), "ro last block")
    r.shutdown()


def test_simple_replies(uri, base):
    section("simple replies (structured replies not requested)")
    s = connect(uri, structured=False)
    s.set_strict_mode(0)
    check(not s.get_structured_replies_negotiated(), "structured replies negotiated anyway")
    check(not s.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION), "meta context without structured replies")
    size = s.get_size()
    verify(s, base, 2 * MiB, "simple-reply read")
    verify(s, base + 8 * MiB, 1 * MiB, "simple-reply read of zeroed ranges")
    verify(s, base + 333, 7777, "simple-reply unaligned read")
    d = rand_bytes(12345)
    s.pwrite(d, base + 40 * MiB + 77)
    model.write(base + 40 * MiB + 77, d)
    verify(s, base + 40 * MiB, 64 * KiB, "simple-reply after write")
    s.zero(4096, base + 40 * MiB)
    model.zero(base + 40 * MiB, 4096)
    s.trim(4096, base + 40 * MiB + 8192)
    model.zero(base + 40 * MiB + 8192, 4096)
    s.flush()
    verify(s, base + 40 * MiB, 64 * KiB, "simple-reply after zero/trim")
    expect_errno("simple pread past end", errno.EINVAL, s.pread, 4096, size)
    verify(s, base, 4096, "simple-reply read after an error")
    expect_errno("simple pwrite past end", errno.ENOSPC, s.pwrite, bytes(4096), size)
    verify(s, base, 4096, "simple-reply read after an error")
    big = s.pread(32 * MiB, base)
    check_bytes("simple-reply 32 MiB read", big, model.read(base, 32 * MiB))
    s.shutdown()


# ---- raw protocol -----------------------------------------------------------------

NBDMAGIC = 0x4e42444d41474943
IHAVEOPT = 0x49484156454F5054
OPT_REPLY_MAGIC = 0x0003e889045565a9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668e33ef
OPT_GO, OPT_STRUCTURED_REPLY = 7, 8
REP_ACK, REP_INFO = 1, 3
CMD_READ, CMD_WRITE = 0, 1
REPLY_TYPE_OFFSET_DATA, REPLY_TYPE_OFFSET_HOLE, REPLY_TYPE_ERROR = 1, 2, 32769


def parse_uri(uri):
    u = urllib.parse.urlparse(uri)
    export = urllib.parse.unquote(u.path.lstrip("/"))
    if u.scheme == "nbd+unix":
        sock = urllib.parse.parse_qs(u.query)["socket"][0]
        return (socket.AF_UNIX, sock), export
    return (socket.AF_INET, (u.hostname, u.port or 10809)), export


class Raw:
    """A hand-rolled NBD client: fixed newstyle, NBD_OPT_GO, optional structured replies."""

    def __init__(self, uri, structured=False):
        (fam, addr), export = parse_uri(uri)
        self.s = socket.socket(fam, socket.SOCK_STREAM)
        self.s.settimeout(10)
        self.s.connect(addr)
        magic, opt_magic, hflags = struct.unpack(">QQH", self.recv(18))
        check(magic == NBDMAGIC and opt_magic == IHAVEOPT, "raw: bad server greeting")
        check(hflags & 1, "raw: server is not fixed-newstyle")
        self.s.sendall(struct.pack(">I", 1 | 2))  # FIXED_NEWSTYLE | NO_ZEROES
        self.structured = False
        if structured:
            self.s.sendall(struct.pack(">QII", IHAVEOPT, OPT_STRUCTURED_REPLY, 0))
            _, typ, _ = self.opt_reply(OPT_STRUCTURED_REPLY)
            check(typ == REP_ACK, f"raw: STRUCTURED_REPLY answered {typ:#x}")
            self.structured = True
        name = export.encode()
        data = struct.pack(">I", len(name)) + name + struct.pack(">H", 0)
        self.s.sendall(struct.pack(">QII", IHAVEOPT, OPT_GO, len(data)) + data)
        self.size = None
        while True:
            _, typ, payload = self.opt_reply(OPT_GO)
            if typ == REP_ACK:
                break
            check(typ == REP_INFO, f"raw: NBD_OPT_GO answered {typ:#x} {payload!r}")
            (itype,) = struct.unpack(">H", payload[:2])
            if itype == 0:  # NBD_INFO_EXPORT
                self.size, self.tflags = struct.unpack(">QH", payload[2:12])
        check(self.size is not None, "raw: no NBD_INFO_EXPORT before ACK")
        self.cookie = 100

    def recv(self, n):
        b = bytearray()
        while len(b) < n:
            part = self.s.recv(n - len(b))
            if not part:
                raise CheckFailed(f"raw: connection closed after {len(b)} of {n} bytes")
            b += part
        return bytes(b)

    def opt_reply(self, opt):
        magic, ropt, typ, ln = struct.unpack(">QIII", self.recv(20))
        check(magic == OPT_REPLY_MAGIC and ropt == opt, f"raw: bad option reply {magic:#x} {ropt}")
        return ropt, typ, self.recv(ln)

    def request(self, typ, offset, length, flags=0, payload=b"", magic=REQUEST_MAGIC):
        self.cookie += 1
        self.s.sendall(struct.pack(">IHHQQI", magic, flags, typ, self.cookie, offset, length) + payload)
        return self.cookie

    def simple_reply(self, cookie, data_len):
        magic, err, rc = struct.unpack(">IIQ", self.recv(16))
        check(magic == SIMPLE_REPLY_MAGIC, f"raw: reply magic {magic:#x}")
        check(rc == cookie, f"raw: reply cookie {rc} for request {cookie}")
        return err, (self.recv(data_len) if err == 0 and data_len else b"")

    def structured_reply(self, cookie, offset, length, is_read=False):
        """Read chunks until DONE; returns (errno or 0, bytes read). The spec lets a
        server answer anything but a READ with a simple reply even here."""
        buf = bytearray(length)
        err = 0
        while True:
            (magic,) = struct.unpack(">I", self.recv(4))
            if magic == SIMPLE_REPLY_MAGIC and not is_read:
                err, rc = struct.unpack(">IQ", self.recv(12))
                check(rc == cookie, f"raw: reply cookie {rc} for request {cookie}")
                return err, b""
            check(magic == STRUCTURED_REPLY_MAGIC, f"raw: chunk magic {magic:#x}")
            flags, typ, rc, ln = struct.unpack(">HHQI", self.recv(16))
            check(rc == cookie, f"raw: chunk cookie {rc} for request {cookie}")
            payload = self.recv(ln)
            if typ == REPLY_TYPE_OFFSET_DATA:
                (o,) = struct.unpack(">Q", payload[:8])
                buf[o - offset:o - offset + ln - 8] = payload[8:]
            elif typ == REPLY_TYPE_OFFSET_HOLE:
                o, hl = struct.unpack(">QI", payload)
                buf[o - offset:o - offset + hl] = bytes(hl)
            elif typ & 0x8000:
                (err,) = struct.unpack(">I", payload[:4])
            if flags & 1:
                return err, bytes(buf)

    def expect_closed(self, what):
        """The server must close the connection (EOF or reset) within 10 s."""
        try:
            while True:
                b = self.s.recv(65536)
                if not b:
                    break
        except (ConnectionResetError, BrokenPipeError):
            pass
        except socket.timeout:
            raise CheckFailed(f"raw: {what}: server did not close the connection within 10 s")
        print(f"    {what}: server closed the connection")
        self.s.close()

    def close(self):
        self.request(2, 0, 0)  # NBD_CMD_DISC
        self.s.close()


def test_raw(uri, base, h_size):
    section("raw protocol: bad magic, truncation, unknown commands, EXPORT_NAME, flags")
    want = model.read(base, 4096)

    # Unknown command type: EINVAL, and the connection still serves a READ.
    r = Raw(uri)
    c = r.request(0x55, base, 4096)
    err, _ = r.simple_reply(c, 0)
    check(err == errno.EINVAL, f"raw: unknown command answered errno {err}, want EINVAL")
    c = r.request(CMD_READ, base, 4096)
    err, data = r.simple_reply(c, 4096)
    check(err == 0, f"raw: READ after unknown command failed with errno {err}")
    check_bytes("raw READ after unknown command", data, want)
    # Unknown flag bits on a READ: an error, connection still fine.
    c = r.request(CMD_READ, base, 4096, flags=1 << 9)
    err, _ = r.simple_reply(c, 4096)
    check(err == errno.EINVAL, f"raw: READ with unknown flag answered errno {err}, want EINVAL")
    c = r.request(CMD_READ, base, 4096)
    err, data = r.simple_reply(c, 4096)
    check(err == 0 and data == want, "raw: READ after bad flags")
    r.close()
    print("    unknown command -> EINVAL, next READ served (simple replies)")

    # The same with structured replies: the error arrives as an ERROR chunk.
    r = Raw(uri, structured=True)
    c = r.request(0x55, base, 4096)
    err, _ = r.structured_reply(c, base, 0)
    check(err == errno.EINVAL, f"raw: unknown command answered errno {err} (structured), want EINVAL")
    c = r.request(CMD_READ, base, 4096)
    err, data = r.structured_reply(c, base, 4096, is_read=True)
    check(err == 0, f"raw: structured READ after unknown command failed with errno {err}")
    check_bytes("raw structured READ after unknown command", data, want)
    r.close()
    print("    unknown command -> EINVAL, next READ served (structured replies)")

    # Bad request magic: the server must close.
    r = Raw(uri)
    r.request(CMD_READ, base, 4096, magic=0x12345678)
    r.expect_closed("bad request magic")

    # A WRITE whose payload is cut short: the server must close, and must not
    # apply the partial write.
    r = Raw(uri)
    r.request(CMD_WRITE, base, 4096, payload=b"\xee" * 100)
    r.s.shutdown(socket.SHUT_WR)
    r.expect_closed("truncated WRITE payload")

    # A request header cut short.
    r = Raw(uri)
    r.s.sendall(struct.pack(">IHH", REQUEST_MAGIC, 0, CMD_READ))
    r.s.shutdown(socket.SHUT_WR)
    r.expect_closed("truncated request header")

    # Bad option magic during the handshake.
    (fam, addr), _ = parse_uri(uri)
    s = socket.socket(fam, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(addr)
    s.recv(18)
    s.sendall(struct.pack(">I", 3))
    s.sendall(struct.pack(">QII", 0x1122334455667788, OPT_GO, 0))
    raw = Raw.__new__(Raw)
    raw.s = s
    raw.expect_closed("bad option magic")

    # A WRITE over the maximum payload: refused, and either its payload is
    # drained (the connection keeps working) or the connection is closed.
    r = Raw(uri)
    n = 32 * MiB + 4096
    c = r.request(CMD_WRITE, base, n, payload=b"\xee" * n)
    err, _ = r.simple_reply(c, 0)
    check(err in (errno.EINVAL, errno.EOVERFLOW, errno.ENOMEM),
          f"raw: oversized WRITE answered errno {err}")
    c = r.request(CMD_READ, base, 4096)
    err, data = r.simple_reply(c, 4096)
    check(err == 0, f"raw: READ after an oversized WRITE failed with errno {err}")
    check_bytes("raw: READ after an oversized WRITE (payload must be drained, not applied)", data, want)
    r.close()
    print("    oversized WRITE -> EINVAL, payload drained, next READ served")

    # NBD_OPT_EXPORT_NAME (what old clients use), with and without NO_ZEROES.
    (fam, addr), export = parse_uri(uri)
    for no_zeroes in (True, False):
        s = socket.socket(fam, socket.SOCK_STREAM)
        s.settimeout(10)
        s.connect(addr)
        raw = Raw.__new__(Raw)
        raw.s, raw.cookie = s, 500
        raw.recv(18)
        s.sendall(struct.pack(">I", 1 | (2 if no_zeroes else 0)))
        s.sendall(struct.pack(">QII", IHAVEOPT, 1, len(export)) + export.encode())
        size, tflags = struct.unpack(">QH", raw.recv(10))
        if not no_zeroes:
            check(raw.recv(124) == bytes(124), "raw: EXPORT_NAME without NO_ZEROES: 124 zero bytes")
        check(size == h_size and tflags & 1, f"raw: EXPORT_NAME size {size} flags {tflags:#x}")
        c = raw.request(CMD_READ, base, 4096)
        err, data = raw.simple_reply(c, 4096)
        check(err == 0 and data == want, f"raw: READ after EXPORT_NAME (errno {err})")
        check_later(tflags & (1 << 7) == 0,
                    f"transmission flags {tflags:#x} after NBD_OPT_EXPORT_NAME (NO_ZEROES={no_zeroes}) without structured replies "
                    "advertise NBD_FLAG_SEND_DF; the spec says the server MUST leave it clear unless "
                    "structured replies were negotiated (and the server answers DF reads here with EINVAL)")
        raw.close()
    print("    NBD_OPT_EXPORT_NAME with and without NO_ZEROES: size, flags, READ")
    s = socket.socket(fam, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(addr)
    s.recv(18)
    s.sendall(struct.pack(">I", 3))
    s.sendall(struct.pack(">QII", IHAVEOPT, 1, 7) + b"no-such")
    raw = Raw.__new__(Raw)
    raw.s = s
    raw.expect_closed("NBD_OPT_EXPORT_NAME of an unknown export")

    # Transmission flags after NBD_OPT_GO, with and without structured replies.
    base_flags = 0x1 | 0x4 | 0x8 | 0x20 | 0x40 | 0x100 | 0x400 | 0x800
    for st in (True, False):
        r = Raw(uri, structured=st)
        want_flags = base_flags | (0x80 if st else 0)
        check(r.tflags & base_flags == base_flags and not r.tflags & 2,
              f"raw: NBD_OPT_GO (structured={st}) flags {r.tflags:#x} lack some of {base_flags:#x}")
        check_later(r.tflags == want_flags,
                    f"NBD_OPT_GO with structured replies {'negotiated' if st else 'NOT negotiated'}: "
                    f"transmission flags {r.tflags:#x}, expected {want_flags:#x} (NBD_FLAG_SEND_DF "
                    "MUST be clear unless structured replies were negotiated)")
        if r.tflags & 0x80:
            # Advertised, so a client may send it: a DF read must then succeed.
            c = r.request(CMD_READ, base, 4096, flags=1 << 2)
            if st:
                err, data = r.structured_reply(c, base, 4096, is_read=True)
            else:
                err, data = r.simple_reply(c, 4096)
            check_later(err == 0 and data == want,
                        f"READ with NBD_CMD_FLAG_DF (advertised by NBD_FLAG_SEND_DF) on a connection with "
                        f"structured replies {'negotiated' if st else 'NOT negotiated'} failed with errno {err}")
        r.close()

    # The server survived all that.
    h = connect(uri)
    check_bytes("read after raw abuse (truncated write must not be applied)", h.pread(4096, base), want)
    h.shutdown()


def main():
    print(f"nbdsh_commands.py: libnbd {nbd.NBD().get_version()}, seed {SEED}", flush=True)
    h = connect(URI)
    size = test_negotiation(h)
    # Let malformed requests reach the server instead of being refused by libnbd.
    h.set_strict_mode(0)
    check(h.get_strict_mode() == 0, "strict mode not cleared")
    base = 64 * MiB
    test_fresh_holes(h, base)
    test_writes_and_reads(h, base)
    test_structured_reads(h, base)
    test_trim(h, base)
    test_zero(h, base)
    test_cache(h, base)
    test_block_status(h, base)
    test_many_in_flight(h, base)
    test_two_connections_same_blocks(URI, base)
    test_max_block(h, base)
    test_errors(h, base, size)
    test_read_only(RO_URI)
    test_simple_replies(URI, base)
    test_raw(URI, base, size)
    # The first handle outlived everything above.
    for off in range(base, base + 48 * MiB, 16 * MiB):  # reads are capped at 32 MiB
        verify(h, off, 16 * MiB, "final check on the first handle")
    h.flush()
    h.shutdown()
    if deferred:
        raise CheckFailed(f"{len(deferred)} deferred failure(s):\n  " + "\n  ".join(deferred))
    print("nbdsh_commands.py: all checks passed", flush=True)


if __name__ == "__main__":
    try:
        main()
    except CheckFailed as e:
        traceback.print_exc()
        print(f"FAIL: {e}", file=sys.stderr, flush=True)
        sys.exit(1)
    except nbd.Error as e:
        traceback.print_exc()
        print(f"FAIL: unexpected libnbd error: {e} (errnum {e.errnum})", file=sys.stderr, flush=True)
        sys.exit(1)
