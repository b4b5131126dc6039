"""The disk spool: batches that cannot be uploaded yet, kept on disk, oldest first.

A spool is a directory of append-only files ``spool-<16-digit seq>.xsp``.
Each file is a sequence of records, one per batch::

    header (24 bytes, little-endian)
        magic        4s   b"XSPL"
        version      B    1
        kind         B    1 = a batch of segment documents
        reserved     H    0
        count        I    number of documents
        length       I    payload length in bytes
        payload_crc  I    CRC-32 of the payload
        header_crc   I    CRC-32 of the 20 bytes before it
    payload
        count x u32       document lengths
        the documents, concatenated

A batch is written with one ``writev`` call; files are never rewritten
(files from an earlier run are only read, new data always starts a new
file, so a torn tail can never corrupt later records).  A new file starts
when the current one reaches ``file_bytes``.

Progress is kept per file in a 16-byte sidecar ``spool-<seq>.ack`` (magic,
offset, CRC-32), overwritten in place when the acknowledged prefix of that
file grows; a file is deleted once every record in it is acknowledged.
Delivery is at least once: a batch sent but not yet acknowledged when the
process dies (or acknowledged out of order behind one still in flight) is
sent again by the next run.  X-Ray keys segments by id, so a repeated
complete segment document is harmless.

Data is written to the kernel at once (a kill -9 loses nothing that reached
the spool) and made durable with fsync at most every ``flush_interval``
seconds and when a file is finished (a power loss can cost the last
``flush_interval`` seconds of spooled batches, and may resend some).  An
fsync waits for the device (tens of ms on a busy disk, seconds on a slow
network volume), so with ``run_blocking`` (the daemon passes
``offload.thread_pool_runner(reactor)``) it runs in a thread, one job at a time, on
duplicated descriptors that the job owns: the event loop only duplicates
descriptors and hands them over.  Writes stay on the event loop: one batch
is copied to the page cache, well under a millisecond (docs/durability.md
has the measurements).

Every document appended ends in exactly one of: acknowledged, or counted as
lost (oldest data dropped when the spool is full, corruption found on
disk).  The spool counts (``Counters.spooled``, ``lost``) and logs those
itself; ``replayed`` is counted by whoever delivers what ``take`` handed out
(the batcher), so a batch read again by every failed probe counts once.
With a ``Tally`` (the span spool) the same events are also counted in its
unit (spans), weighed from the batch in hand; for a file dropped unread the
spool keeps each file's weight from what this run wrote to it (unknown for
files of an earlier run, whose payloads are not read at open).
A batch that cannot be written (disk full, no file descriptors left, an
I/O error) is not appended at all: ``append`` raises ``SpoolWriteError``
and the batch stays its caller's.  The spool then says
once that it is unwritable and refuses further writes without touching the
disk until ``write_retry_at``; the next write after that is the probe
(backing off from ``PROBE_MIN`` to ``PROBE_MAX`` seconds while it fails).

Everything runs on the reactor thread; a lock file (flock) keeps a second
daemon out of the same directory.  Like ssh with its key files, the spool
refuses a directory that another user could write to or owns, and it never
follows a symbolic link inside it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import heapq
import os
import re
import stat
import struct
import zlib
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from xraytwisted.observe.counters import Counters
from xraytwisted.observe.logs import Throttle, suppressed_note

MAGIC = b"XSPL"
VERSION = 1
KIND_BATCH = 1
_HEAD = struct.Struct("<4sBBHIII")  # everything the header CRC covers
HEADER = struct.Struct("<4sBBHIIII")
HEADER_SIZE = HEADER.size  # 24
ACK_MAGIC = b"XSPA"
_ACK_HEAD = struct.Struct("<4sQ")
ACK = struct.Struct("<4sQI")  # magic, acknowledged offset, CRC-32 of the first 12 bytes
MAX_FIELD = 2**32 - 1

DEFAULT_FILE_BYTES = 8 * 1024 * 1024
MIN_FILE_BYTES = 64 * 1024
FLUSH_INTERVAL = 1.0
MAX_PROBLEMS = 100  # kept in Spool.problems (older ones are only in the log)
# After a failed write, the disk is tried again after PROBE_MIN seconds,
# doubling up to PROBE_MAX while it keeps failing: a full disk is not hammered,
# and one that has room again is used within half a minute.
PROBE_MIN = 1.0
PROBE_MAX = 30.0
# Errors that say "not now" rather than "never": a read that fails with one
# is tried again later instead of the data being given up as unreadable.
TRANSIENT_ERRNOS = frozenset(
    {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.EAGAIN, errno.ENOBUFS, errno.EINTR}
)
READ_RETRY = 1.0  # seconds before a read that failed that way is tried again
LOCK_NAME = "lock"
_DATA_NAME = re.compile(r"spool-(\d{16})\.xsp")
_ACK_NAME = re.compile(r"spool-(\d{16})\.ack")
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_O_DIRECTORY = getattr(os, "O_DIRECTORY", 0)
# Every file in the spool directory is opened without following symbolic
# links: a link planted there must not make the daemon write elsewhere.
_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_RESYNC_CHUNK = 1024 * 1024


# (fd, path, close it after?): what one sync job fsyncs; it owns the fds it closes.
SyncJob = list[tuple[int, str, bool]]
SyncErrors = list[tuple[str, str, OSError]]  # ("sync" or "close", path, error)
BlockingRunner = Callable[[Callable[[], SyncErrors]], "Deferred[SyncErrors]"]


class Tally(Protocol):
    """What a pipeline's documents weigh in a second unit, counted beside its ``Counters``.

    The span pipeline's documents are OTLP requests and its tally counts
    their spans (read from each document's frame, never from its body); the
    segment pipeline has none.  ``weigh`` runs once per batch spooled, read
    back, given back or lost, never per document arriving.
    """

    def weigh(self, docs: Sequence[bytes]) -> int: ...

    def spooled(self, weight: int) -> None: ...

    def replayed(self, weight: int) -> None: ...

    def lost(self, docs: int, weight: int | None) -> None:
        """``docs`` accepted documents are lost; they weighed ``weight`` (None: not known)."""

    def describe(self, docs: int, weight: int, unknown: int) -> str:
        """For a log line about ``docs`` documents of which ``unknown`` have no known weight.

        ``weight`` is what the others weigh; the text follows "N segments".
        """


class SpoolError(Exception):
    """The spool cannot be used; str() is the one line to show."""


class SpoolWriteError(Exception):
    """``append`` did not store the batch: it is still the caller's.  str() says why.

    ``disk`` is True when the disk refused (it may take it later: full, no
    descriptors, I/O error), False when this batch can never be stored (larger
    than the whole spool).
    """

    def __init__(self, reason: str, *, disk: bool) -> None:
        super().__init__(reason)
        self.disk = disk


@dataclass(frozen=True)
class Problem:
    """Something wrong found in the spool (or done to it) that cost documents."""

    kind: str  # "torn tail", "corrupt record", "spool full"
    path: str
    offset: int
    nbytes: int  # bytes skipped or dropped
    docs: int | None  # documents lost (None: unknown, the record header was unreadable)
    detail: str = ""

    def __str__(self) -> str:
        docs = "an unknown number of" if self.docs is None else str(self.docs)
        extra = f": {self.detail}" if self.detail else ""
        return f"{self.kind} in {self.path} at offset {self.offset} ({docs} segments){extra}"


class SpooledBatch:
    """One batch read back from the spool; give it back with ``ack`` or ``release``."""

    __slots__ = ("_file", "docs", "nbytes", "offset")

    def __init__(self, file: _File, offset: int, nbytes: int, docs: list[bytes]) -> None:
        self._file = file
        self.offset = offset
        self.nbytes = nbytes  # bytes of the record on disk
        self.docs = docs

    @property
    def file_seq(self) -> int:
        return self._file.seq

    def __len__(self) -> int:
        return len(self.docs)

    def __repr__(self) -> str:
        return f"<SpooledBatch {len(self.docs)} docs at {self._file.seq}:{self.offset}>"


class _ReadLater(Exception):
    """``_read`` could not read a record now (a transient error); nothing moved."""


class _File:
    """One spool file and what is known about it (no I/O here)."""

    __slots__ = (
        "ack_fd",
        "acked_at",
        "dropped",
        "end",
        "outstanding",
        "path",
        "pending_bytes",
        "pending_docs",
        "read_at",
        "rfd",
        "seq",
        "size",
        "skips",
        "weight",
        "wfd",
    )

    def __init__(self, directory: str, seq: int) -> None:
        self.seq = seq
        self.path = os.path.join(directory, f"spool-{seq:016d}.xsp")
        self.wfd: int | None = None  # open for appending: the current write file only
        self.rfd: int | None = None  # opened on first read
        self.ack_fd: int | None = None
        self.size = 0  # bytes on disk (with any torn tail)
        self.end = 0  # end of the readable records
        self.read_at = 0  # next record never handed out
        self.acked_at = 0  # durable progress (what the .ack sidecar says)
        self.pending_docs = 0  # in records neither acknowledged nor known lost
        self.pending_bytes = 0
        # offset -> (docs, record bytes, in flight?): handed out, not acknowledged.
        self.outstanding: dict[int, tuple[int, int, bool]] = {}
        self.skips: dict[int, int] = {}  # unreadable region start -> next good record
        self.dropped = False
        # With a Tally: the weight of the records neither handed out, acknowledged nor
        # known lost.  None when unknown: a file from an earlier run (opening reads only
        # record headers), or one with a record that could not be read.
        self.weight: int | None = None

    @property
    def ack_path(self) -> str:
        return self.path[: -len(".xsp")] + ".ack"

    def done_prefix(self) -> int:
        """Everything before this offset is acknowledged (or known lost)."""
        return min(self.outstanding) if self.outstanding else self.read_at


# ---------------------------------------------------------------------------
# The record format (pure)


def encode(docs: Sequence[bytes]) -> list[bytes]:
    """One record for ``docs`` as buffers to write in order (header, lengths, documents)."""
    count = len(docs)
    table = struct.pack(f"<{count}I", *map(len, docs))
    body = b"".join(docs)
    length = len(table) + len(body)
    if count > MAX_FIELD or length > MAX_FIELD:
        raise ValueError(f"a batch of {length} bytes is too large for one spool record")
    crc = zlib.crc32(body, zlib.crc32(table))
    head = _HEAD.pack(MAGIC, VERSION, KIND_BATCH, 0, count, length, crc)
    return [head + struct.pack("<I", zlib.crc32(head)), table, body]


def parse_header(data: bytes) -> tuple[int, int, int] | None:
    """(count, payload length, payload CRC) of a valid header, else None.

    Raises SpoolError for a valid header of a format version this code does
    not know (written by a newer daemon: skipping it would lose data).
    """
    if len(data) < HEADER_SIZE or data[:4] != MAGIC:
        return None
    _, version, kind, _, count, length, crc, head_crc = HEADER.unpack_from(data)
    if zlib.crc32(data[: HEADER_SIZE - 4]) != head_crc:
        return None
    if version != VERSION or kind != KIND_BATCH:
        raise SpoolError(
            f"spool record format {version}/{kind} is not known to this daemon (it was written "
            "by a newer version); run that version to send it, or move the spool directory away"
        )
    if length < 4 * count:
        return None
    return count, length, crc


def decode(payload: bytes, count: int, crc: int) -> list[bytes] | None:
    """The documents of a record's payload, or None when it is corrupt."""
    if zlib.crc32(payload) != crc or len(payload) < 4 * count:
        return None
    lengths = struct.unpack_from(f"<{count}I", payload)
    pos = 4 * count
    if pos + sum(lengths) != len(payload):
        return None
    docs = []
    for length in lengths:
        docs.append(payload[pos : pos + length])
        pos += length
    return docs


def encode_ack(offset: int) -> bytes:
    head = _ACK_HEAD.pack(ACK_MAGIC, offset)
    return head + struct.pack("<I", zlib.crc32(head))


def decode_ack(data: bytes) -> int | None:
    if len(data) != ACK.size:
        return None
    magic, offset, crc = ACK.unpack(data)
    if magic != ACK_MAGIC or zlib.crc32(data[:12]) != crc:
        return None
    return int(offset)


Reader = Callable[[int, int], bytes]  # (offset, size) -> bytes (shorter at EOF)


@dataclass
class Walk:
    """What a header-only pass over one file found."""

    end: int  # end of the last readable record
    pending_docs: int  # in records at or after the acknowledged offset
    pending_bytes: int
    acked_at: int  # the acknowledged offset, moved back to a record boundary if need be
    skips: dict[int, int]
    problems: list[Problem]
    torn: bool  # unreadable bytes from ``end`` to the end of the file


def walk(read: Reader, size: int, acked_at: int, path: str) -> Walk:
    """Check every record header of a file without reading payloads.

    Payload CRCs are checked later, when a record is read for upload, so
    opening a large spool reads ~24 bytes per batch.
    """
    offset = 0
    docs = nbytes = 0
    boundary = 0  # last record boundary at or before acked_at
    skips: dict[int, int] = {}
    problems: list[Problem] = []
    torn = False
    while offset < size:
        if offset <= acked_at:
            boundary = offset
        parsed = parse_header(read(offset, HEADER_SIZE)) if size - offset >= HEADER_SIZE else None
        if parsed is not None and offset + HEADER_SIZE + parsed[1] <= size:
            count, length, _ = parsed
            if offset >= acked_at:
                docs += count
                nbytes += HEADER_SIZE + length
            offset += HEADER_SIZE + length
            continue
        following = resync(read, offset + 1, size) if parsed is None else None
        if following is None:
            # Nothing readable after this point: the record being written when
            # the process or machine stopped.
            torn = True
            if offset >= acked_at:
                problems.append(
                    Problem(
                        "torn tail",
                        path,
                        offset,
                        size - offset,
                        parsed[0] if parsed is not None else None,
                        "the daemon stopped while writing this record",
                    )
                )
            break
        if offset >= acked_at:
            problems.append(
                Problem(
                    "corrupt record", path, offset, following - offset, None, "unreadable header"
                )
            )
        skips[offset] = following
        offset = following
    end = offset
    if acked_at >= end:
        boundary = end
    elif boundary != acked_at:
        # The sidecar points inside a record (it should never): count from the
        # record it is in, which is sent again.
        return walk(read, size, boundary, path)
    return Walk(end, docs, nbytes, boundary, skips, problems, torn)


def resync(read: Reader, start: int, size: int) -> int | None:
    """The offset of the next record with a valid header at or after ``start``."""
    pos = start
    while pos < size:
        chunk = read(pos, _RESYNC_CHUNK + HEADER_SIZE)
        if not chunk:
            return None
        at = chunk.find(MAGIC)
        while 0 <= at < _RESYNC_CHUNK:
            candidate = pos + at
            try:
                parsed = parse_header(read(candidate, HEADER_SIZE))
            except SpoolError:
                parsed = None
            if parsed is not None and candidate + HEADER_SIZE + parsed[1] <= size:
                return candidate
            at = chunk.find(MAGIC, at + 1)
        pos += _RESYNC_CHUNK
    return None


# ---------------------------------------------------------------------------
# The spool


class Spool:
    """Batches on disk, handed out oldest first, forgotten once acknowledged.

    Use ``Spool.open``.  ``append`` a batch that cannot be uploaded now;
    ``take`` the oldest batch not already handed out, upload it, then
    ``ack`` it (sent) or ``release`` it (not sent: ``take`` hands it out
    again, before anything newer).
    """

    log = Logger()

    def __init__(
        self,
        directory: str,
        max_bytes: int,
        clock: IReactorTime,
        counters: Counters,
        file_bytes: int,
        flush_interval: float,
        lock_fd: int,
        dir_fd: int,
        run_blocking: BlockingRunner | None = None,
        tally: Tally | None = None,
    ) -> None:
        self.directory = directory
        self.tally = tally
        self.max_bytes = max_bytes
        self.file_bytes = file_bytes
        self.flush_interval = flush_interval
        self._clock = clock
        self._counters = counters
        self._lock_fd: int | None = lock_fd
        self._dir_fd = dir_fd
        self._files: deque[_File] = deque()
        self._by_seq: dict[int, _File] = {}
        self._write: _File | None = None  # where append goes; None: start a new file
        self._next_seq = 1
        self._released: list[tuple[int, int]] = []  # (seq, offset) heap
        self.pending_docs = 0  # stored and not acknowledged (in flight included)
        self.pending_bytes = 0
        self.in_flight_docs = 0
        self.disk_bytes = 0  # size of all spool files: what max_bytes limits
        self.dropped_docs = 0  # lost because the spool was full
        self.corrupt_docs = 0  # lost to torn or corrupt records
        self.close_errors = 0  # os.close calls that failed (logged; nothing else to do)
        # Why the last write failed, None while writes work; no write is
        # tried before write_retry_at (the probe's backoff).
        self.unwritable: str | None = None
        self.unwritable_since = 0.0
        self.write_retry_at = 0.0
        self.failed_writes = 0  # since the spool became unwritable
        self._probe_delay = PROBE_MIN
        self.read_retry_at = 0.0  # no read before this (after a transient read error)
        self.problems: deque[Problem] = deque(maxlen=MAX_PROBLEMS)
        self._unsynced: set[int] = set()  # fds with data or acks written since the last fsync
        self._dir_dirty = False
        self._sealed: list[tuple[int, str]] = []  # finished files' fds: sync, then close
        self._run_blocking = run_blocking  # None: fsync here, on the caller's thread
        self._syncing = False  # a sync job is running (at most one)
        self._sync_again = False  # something asked for a sync meanwhile
        self._flush_call: IDelayedCall | None = None
        self._throttle = Throttle(clock, 10.0)
        self.closed = False

    # -- opening ------------------------------------------------------------

    @classmethod
    def open(
        cls,
        directory: str,
        max_bytes: int,
        clock: IReactorTime,
        counters: Counters | None = None,
        *,
        file_bytes: int | None = None,
        flush_interval: float = FLUSH_INTERVAL,
        run_blocking: BlockingRunner | None = None,
        tally: Tally | None = None,
    ) -> Spool:
        """Lock ``directory`` (created 0700 if need be) and read what is in it.

        Raises SpoolError (one line) when the directory cannot be used, is
        not private to this user (see ``check_private``) or another daemon
        has it.  Torn and corrupt data found are logged and counted as lost;
        the rest is waiting to be taken.  ``run_blocking`` runs the periodic
        fsync off the caller's thread (see the module docstring).  ``tally``
        counts what the documents weigh (the span spool: their spans).
        """
        if max_bytes <= 0:
            raise SpoolError(f"spool size must be positive, not {max_bytes} bytes")
        if file_bytes is None:
            file_bytes = max(MIN_FILE_BYTES, min(DEFAULT_FILE_BYTES, max_bytes // 8))
        directory = os.path.abspath(directory)
        try:
            os.makedirs(os.path.dirname(directory), exist_ok=True)
            try:
                os.mkdir(directory, 0o700)
                created = True
            except FileExistsError:
                created = False
            dir_fd = os.open(directory, os.O_RDONLY | _O_DIRECTORY | _O_CLOEXEC)
            if created:
                os.fchmod(dir_fd, 0o700)  # whatever the umask took away
        except OSError as e:
            raise SpoolError(
                f"cannot use spool directory {directory}: {_reason(e)} "
                "(check --spool-dir / Spool.Dir and its permissions)"
            ) from None
        try:
            check_private(directory, os.fstat(dir_fd))
            lock_fd = _lock(directory)
        except BaseException:
            os.close(dir_fd)
            raise
        spool = cls(
            directory,
            max_bytes,
            clock,
            counters if counters is not None else Counters(),
            file_bytes,
            flush_interval,
            lock_fd,
            dir_fd,
            run_blocking,
            tally,
        )
        try:
            spool._load()
        except BaseException:
            spool._close_fds()
            raise
        return spool

    def _load(self) -> None:
        try:
            names = os.listdir(self.directory)
        except OSError as e:
            raise SpoolError(
                f"cannot read spool directory {self.directory}: {_reason(e)}"
            ) from None
        data = sorted(int(m.group(1)) for n in names if (m := _DATA_NAME.fullmatch(n)))
        for seq in data:
            self._load_file(seq)
        # Acknowledgement files whose data file is gone (deleted just before a crash).
        for name in names:
            m = _ACK_NAME.fullmatch(name)
            if m and int(m.group(1)) not in self._by_seq:
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(self.directory, name))
        if data:
            self._next_seq = data[-1] + 1
        if self.disk_bytes > self.max_bytes:
            self._make_room(0)
        if self.pending_docs:
            self.log.info(
                "Spool {dir}: {docs} segments ({mb:.1f} MB) from an earlier run are waiting "
                "to be sent",
                dir=self.directory,
                docs=self.pending_docs,
                mb=self.pending_bytes / 1e6,
            )
        self._flush_soon()

    def _load_file(self, seq: int) -> None:
        f = _File(self.directory, seq)
        # Not kept open: a large spool has many files; reading opens them again.
        rfd = -1
        try:
            rfd = os.open(f.path, os.O_RDONLY | _O_CLOEXEC | _O_NOFOLLOW)
            size = os.fstat(rfd).st_size
            acked_at = self._read_ack(f)
            result = walk(lambda off, n: os.pread(rfd, n, off), size, acked_at, f.path)
            if result.torn:
                # The tail is garbage from an interrupted write: cut it off so
                # it is reported once, not on every start.
                wfd = os.open(f.path, os.O_WRONLY | _O_CLOEXEC | _O_NOFOLLOW)
                try:
                    os.ftruncate(wfd, result.end)
                    os.fsync(wfd)
                finally:
                    os.close(wfd)
                size = result.end
        except OSError as e:
            raise SpoolError(f"cannot read spool file {f.path}: {_open_reason(e)}") from None
        finally:
            if rfd >= 0:
                os.close(rfd)
        f.size = size
        f.end = result.end
        f.acked_at = f.read_at = result.acked_at
        f.skips = result.skips
        f.pending_docs = result.pending_docs
        f.pending_bytes = result.pending_bytes
        for problem in result.problems:
            self._report(problem)
        self._files.append(f)
        self._by_seq[seq] = f
        self.disk_bytes += f.size
        self.pending_docs += f.pending_docs
        self.pending_bytes += f.pending_bytes
        if f.read_at >= f.end:
            self._delete(f)

    def _read_ack(self, f: _File) -> int:
        data = _read_small(f.ack_path, ACK.size + 1)
        if data is None:
            return 0
        offset = decode_ack(data)
        if offset is None:
            # Not worth a Problem: no data is lost, some is sent twice.
            self.log.warn(
                "Spool acknowledgement file {path} is unreadable; the batches of {data} will "
                "be sent again (X-Ray ignores repeated segments)",
                path=f.ack_path,
                data=f.path,
            )
            return 0
        return offset

    # -- writing ------------------------------------------------------------

    def accepting(self) -> bool:
        """Whether ``append`` would try the disk now (False while a failed write backs off)."""
        return self.unwritable is None or self._clock.seconds() >= self.write_retry_at

    def try_writes_now(self) -> None:
        """End the backoff: the next ``append`` tries the disk (a last chance at shutdown)."""
        self.write_retry_at = 0.0

    def append(self, docs: Sequence[bytes]) -> int:
        """Store one batch (one write).  Returns how many documents making room cost.

        To make room, the oldest files are deleted; documents in them not yet
        sent are lost (counted in ``Counters.lost`` and logged here).

        Raises SpoolWriteError, having stored and counted nothing, when the
        batch cannot be written now (the disk refused it, or a write failed
        less than ``write_retry_at`` ago) or ever (larger than the spool).
        """
        if self.closed:
            raise SpoolError("the spool is closed")
        if not docs:
            return 0
        if not self.accepting():
            raise SpoolWriteError(self.unwritable or "", disk=True)
        try:
            parts = encode(docs)
        except ValueError as e:
            raise SpoolWriteError(str(e), disk=False) from None
        size = HEADER_SIZE + len(parts[1]) + len(parts[2])
        if size > self.max_bytes:
            raise SpoolWriteError(
                f"the batch ({size} bytes) is larger than the whole spool", disk=False
            )
        count = len(docs)
        lost = self._make_room(size)
        f = self._write
        try:
            if f is None:
                f = self._new_file()
            assert f.wfd is not None
            _write_all(f.wfd, parts, size)
        except OSError as e:
            if f is not None:
                self._abandon_write_file(f)
            reason = _errno_text(e)
            self._write_failed(reason, e)
            raise SpoolWriteError(reason, disk=True) from None
        if self.unwritable is not None:
            self._write_recovered()
        f.end = f.size = f.end + size
        f.pending_docs += count
        f.pending_bytes += size
        self.pending_docs += count
        self.pending_bytes += size
        self.disk_bytes += size
        self._counters.spooled += count
        tally = self.tally
        if tally is not None:
            weight = tally.weigh(docs)
            tally.spooled(weight)
            if f.weight is not None:
                f.weight += weight
        self._unsynced.add(f.wfd)
        self._flush_soon()
        if f.end >= self.file_bytes:
            self._seal(f)
        return lost

    def _write_failed(self, reason: str, e: OSError) -> None:
        now = self._clock.seconds()
        self.failed_writes += 1
        if self.unwritable is None:
            self.unwritable_since = now
            self._probe_delay = PROBE_MIN
            self.log.error(
                "Spool {dir} unwritable: {error}; keeping batches in memory and retrying the "
                "disk in {delay:g} s, backing off to every {most:g} s. {advice}",
                dir=self.directory,
                error=reason,
                delay=self._probe_delay,
                most=PROBE_MAX,
                advice=_write_advice(e),
            )
        else:
            self._probe_delay = min(PROBE_MAX, self._probe_delay * 2)
        self.unwritable = reason
        self.write_retry_at = now + self._probe_delay

    def _write_recovered(self) -> None:
        self.log.info(
            "Spool {dir} is writable again after {seconds:.0f} s (failed writes meanwhile: "
            "{failed}); batches go to disk again",
            dir=self.directory,
            seconds=self._clock.seconds() - self.unwritable_since,
            failed=self.failed_writes,
        )
        self.unwritable = None
        self.failed_writes = 0
        self.write_retry_at = 0.0

    def _new_file(self) -> _File:
        f = _File(self.directory, self._next_seq)
        self._next_seq += 1
        f.wfd = os.open(
            f.path,
            os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | _O_CLOEXEC | _O_NOFOLLOW,
            0o600,
        )
        self._files.append(f)
        self._by_seq[f.seq] = f
        self._write = f
        self._dir_dirty = True
        if self.tally is not None:
            f.weight = 0  # written by this run: every record's weight is known
        return f

    def _seal(self, f: _File, inline: bool = False) -> None:
        """No more appends to ``f``: make it durable now (once per file) and close it."""
        if f is self._write:
            self._write = None
        fd, f.wfd = f.wfd, None
        if fd is not None:
            self._unsynced.discard(fd)
            if inline or self._run_blocking is None:
                try:
                    os.fsync(fd)
                except OSError as e:
                    self._sync_failed(f.path, e)
                self._close(fd, f.path)
            else:
                self._sealed.append((fd, f.path))  # the sync job closes it
                self._sync(inline=False)
        self._advance(f)

    def _abandon_write_file(self, f: _File) -> None:
        # A failed write may have left part of a record behind; cut it off (best
        # effort: if this fails too, the next start reports a torn tail).
        if f.wfd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(f.wfd, f.end)
        self._seal(f)

    def _make_room(self, size: int) -> int:
        """Delete the oldest files until ``size`` more bytes fit; returns documents lost."""
        lost = 0
        while self._files and self.disk_bytes + size > self.max_bytes:
            f = self._files[0]
            if f is self._write:
                self._seal(f)
                if not self._files or self._files[0] is not f:
                    continue  # it was empty or done, and is gone
            lost += self._drop(f)
        return lost

    def _drop(self, f: _File) -> int:
        """Delete ``f`` for space.  Its batches in flight are left to ack/release."""
        in_flight = sum(docs for docs, _, flying in f.outstanding.values() if flying)
        lost = f.pending_docs - in_flight
        self.pending_docs -= f.pending_docs
        self.pending_bytes -= f.pending_bytes
        self.in_flight_docs -= in_flight
        f.pending_docs = f.pending_bytes = 0
        f.dropped = True
        self._delete(f)
        self.dropped_docs += lost
        self._counters.lost += lost
        weighed = ""
        if self.tally is not None and lost:
            self.tally.lost(lost, f.weight)
            known = f.weight is not None
            weighed = self.tally.describe(lost, f.weight or 0, 0 if known else lost)
        problem = Problem("spool full", f.path, 0, f.size, lost, "oldest file dropped")
        self.problems.append(problem)
        self.log.warn(
            "Spool {dir} is full ({mb} MB): dropped its oldest file {path} with {count} "
            "segments{weighed} not yet sent; they are lost. Raise --spool-max-mb (Spool.MaxMB) "
            "or fix what stops uploads",
            dir=self.directory,
            mb=self.max_bytes // (1024 * 1024),
            path=os.path.basename(f.path),
            count=lost,
            weighed=weighed,
        )
        return lost

    # -- reading ------------------------------------------------------------

    @property
    def ready_docs(self) -> int:
        """Documents ``take`` can hand out now (an upper bound if data is corrupt)."""
        return self.pending_docs - self.in_flight_docs

    def take(self) -> SpooledBatch | None:
        """The oldest batch not handed out yet (released ones first), or None.

        The batch stays in the spool until ``ack``: if the daemon stops
        before that, the next run sends it again.
        """
        if self.closed or self._clock.seconds() < self.read_retry_at:
            return None
        released = self._released
        while released:
            seq, offset = heapq.heappop(released)
            f = self._by_seq.get(seq)
            if f is None or f.dropped:
                continue
            entry = f.outstanding.get(offset)
            if entry is None or entry[2]:
                continue
            try:
                batch = self._read(f, offset)
            except _ReadLater:
                heapq.heappush(released, (seq, offset))
                return None
            if batch is None:
                del f.outstanding[offset]
                self._advance(f)
                continue
            f.outstanding[offset] = (entry[0], entry[1], True)
            self.in_flight_docs += entry[0]
            self._weigh_out(f, batch.docs, -1)
            return batch
        while True:
            # Files before the first one with unread records are only waiting
            # for acknowledgements: few, however large the spool.
            f = next((f for f in self._files if f.read_at < f.end), None)
            if f is None:
                return None
            offset = f.read_at
            following = f.skips.get(offset)
            if following is not None:
                f.read_at = following
                continue
            try:
                batch = self._read(f, offset)
            except _ReadLater:
                return None
            if batch is None:
                self._advance(f)
                continue
            f.outstanding[offset] = (len(batch.docs), batch.nbytes, True)
            self.in_flight_docs += len(batch.docs)
            self._weigh_out(f, batch.docs, -1)
            return batch

    def _weigh_out(self, f: _File, docs: Sequence[bytes], sign: int) -> None:
        """A batch of ``f`` leaves (-1) or comes back to (+1) what a drop of ``f`` would lose."""
        if self.tally is not None and f.weight is not None:
            f.weight += sign * self.tally.weigh(docs)

    def _read(self, f: _File, offset: int) -> SpooledBatch | None:
        """Read the record at ``offset`` (moving ``read_at`` past it if it is next).

        A corrupt record is reported and counted as lost, and None returned.
        Raises _ReadLater when it cannot be read now (no descriptors left,
        say): nothing moved, and ``take`` tries again after ``READ_RETRY`` s.
        """
        read_at = f.read_at
        try:
            if f.rfd is None:
                f.rfd = os.open(f.path, os.O_RDONLY | _O_CLOEXEC | _O_NOFOLLOW)
            rfd = f.rfd
            head = os.pread(rfd, HEADER_SIZE, offset)
            parsed = parse_header(head)
            if parsed is None or offset + HEADER_SIZE + parsed[1] > f.end:
                f.weight = None  # the record's weight can no longer be told apart
                following = resync(lambda o, n: os.pread(rfd, n, o), offset + 1, f.end)
                self._corrupt(f, offset, (following or f.end) - offset, None, "unreadable header")
                if offset == f.read_at:
                    f.read_at = following or f.end
                return None
            count, length, crc = parsed
            size = HEADER_SIZE + length
            if offset == f.read_at:
                f.read_at = offset + size
            payload = os.pread(rfd, length, offset + HEADER_SIZE)
        except OSError as e:
            if e.errno in TRANSIENT_ERRNOS:
                f.read_at = read_at
                self._read_later(f, e)
                raise _ReadLater() from None
            # Unreadable (I/O error, file removed by hand): nothing here can be sent.
            f.weight = None
            self._corrupt(f, offset, f.end - offset, None, _reason(e))
            f.read_at = f.end
            return None
        docs = decode(payload, count, crc)
        if docs is None:
            self._corrupt(f, offset, size, count, "checksum mismatch")
            f.pending_docs -= count
            f.pending_bytes -= size
            self.pending_docs -= count
            self.pending_bytes -= size
            self.corrupt_docs += count
            self._counters.lost += count
            f.weight = None
            if self.tally is not None:
                self.tally.lost(count, None)
            return None
        return SpooledBatch(f, offset, size, docs)

    def _read_later(self, f: _File, e: OSError) -> None:
        self.read_retry_at = self._clock.seconds() + READ_RETRY
        suppressed = self._throttle.check("read later")
        if suppressed is not None:
            self.log.error(
                "Could not read spool file {path} now: {error}; trying again in {delay:g} s "
                "(nothing is lost). {advice}{note}",
                path=f.path,
                error=_errno_text(e),
                delay=READ_RETRY,
                advice=_write_advice(e),
                note=suppressed_note(suppressed),
            )

    def _corrupt(self, f: _File, offset: int, nbytes: int, docs: int | None, why: str) -> None:
        self._report(Problem("corrupt record", f.path, offset, nbytes, docs, why), counted=True)

    def _report(self, problem: Problem, counted: bool = False) -> None:
        """Log a torn/corrupt record; count its documents unless the caller does."""
        self.problems.append(problem)
        if problem.docs and not counted:
            self.corrupt_docs += problem.docs
            self._counters.lost += problem.docs
            if self.tally is not None:
                self.tally.lost(problem.docs, None)
        suppressed = self._throttle.check(problem.kind)
        if suppressed is None:
            return
        if problem.kind == "torn tail":
            what = "ends in a record that was being written when the daemon or machine stopped"
            advice = "Nothing to do unless this happens without a crash"
        else:
            what = f"has a corrupt record ({problem.detail})"
            advice = "Check the disk if this repeats"
        docs = "an unknown number of" if problem.docs is None else str(problem.docs)
        weighed = ""
        if self.tally is not None:
            weighed = self.tally.describe(problem.docs or 0, 0, problem.docs or 0)
        self.log.error(
            "Spool file {path} {what} at offset {offset}; skipped {nbytes} bytes, "
            "{docs} segments{weighed} in them are lost. {advice}{note}",
            path=problem.path,
            what=what,
            offset=problem.offset,
            nbytes=problem.nbytes,
            docs=docs,
            weighed=weighed,
            advice=advice,
            note=suppressed_note(suppressed),
        )

    # -- acknowledging ------------------------------------------------------

    def ack(self, batch: SpooledBatch) -> None:
        """``batch`` was uploaded: forget it (durably, at the next flush)."""
        f = batch._file
        entry = f.outstanding.pop(batch.offset, None)
        if entry is None or f.dropped or self.closed:
            return
        docs, nbytes, flying = entry
        f.pending_docs -= docs
        f.pending_bytes -= nbytes
        self.pending_docs -= docs
        self.pending_bytes -= nbytes
        if flying:
            self.in_flight_docs -= docs
        self._advance(f)

    def release(self, batch: SpooledBatch) -> int:
        """``batch`` was not uploaded: ``take`` hands it out again, oldest first.

        Returns how many documents are lost because the spool dropped the
        batch's file (it was full) while the batch was out; they are counted
        and logged here.
        """
        f = batch._file
        if self.closed:
            return 0
        if f.dropped:
            if f.outstanding.pop(batch.offset, None) is None:
                return 0
            self.dropped_docs += len(batch.docs)
            self._counters.lost += len(batch.docs)
            weighed = ""
            if self.tally is not None:
                weight = self.tally.weigh(batch.docs)
                self.tally.lost(len(batch.docs), weight)
                weighed = self.tally.describe(len(batch.docs), weight, 0)
            self.log.warn(
                "{count} segments{weighed} read back from the spool {dir} could not be sent "
                "and their file was dropped meanwhile (spool full); they are lost",
                count=len(batch.docs),
                weighed=weighed,
                dir=self.directory,
            )
            return len(batch.docs)
        entry = f.outstanding.get(batch.offset)
        if entry is None or not entry[2]:
            return 0
        f.outstanding[batch.offset] = (entry[0], entry[1], False)
        self.in_flight_docs -= entry[0]
        self._weigh_out(f, batch.docs, +1)
        heapq.heappush(self._released, (f.seq, batch.offset))
        return 0

    def _advance(self, f: _File) -> None:
        """Record progress in ``f``'s sidecar; delete ``f`` when all of it is done."""
        if f.dropped:
            return
        done = f.done_prefix()
        if done >= f.end:
            # Everything in it is done (the write file too: the next append
            # starts a new file, so an empty spool is an empty directory).
            if f.pending_docs:
                # Documents in records whose headers were unreadable: their
                # number was unknown until now.
                self.corrupt_docs += f.pending_docs
                self._counters.lost += f.pending_docs
                if self.tally is not None:
                    self.tally.lost(f.pending_docs, None)
                self.pending_docs -= f.pending_docs
                self.pending_bytes -= f.pending_bytes
            self._delete(f)
            return
        if done <= f.acked_at:
            return
        try:
            if f.ack_fd is None:
                f.ack_fd = os.open(
                    f.ack_path, os.O_RDWR | os.O_CREAT | _O_CLOEXEC | _O_NOFOLLOW, 0o600
                )
                self._dir_dirty = True
            os.pwrite(f.ack_fd, encode_ack(done), 0)
            self._unsynced.add(f.ack_fd)
            f.acked_at = done  # only now: a failed write is tried again by the next ack
        except OSError as e:
            # Only costs duplicates after a restart.
            suppressed = self._throttle.check("ack failed")
            if suppressed is not None:
                self.log.error(
                    "Could not record progress in {path}: {error}; after a restart some "
                    "batches will be sent again{note}",
                    path=f.ack_path,
                    error=_errno_text(e),
                    note=suppressed_note(suppressed),
                )
        self._flush_soon()

    def _delete(self, f: _File) -> None:
        """Forget ``f`` and remove it (data file first: a lone .ack is harmless)."""
        for fd in (f.wfd, f.rfd, f.ack_fd):
            if fd is not None:
                self._unsynced.discard(fd)
                self._close(fd, f.path)
        f.wfd = f.rfd = f.ack_fd = None
        if f is self._write:
            self._write = None
        with contextlib.suppress(ValueError):
            self._files.remove(f)
        self._by_seq.pop(f.seq, None)
        self.disk_bytes -= f.size
        for path in (f.path, f.ack_path):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            except OSError as e:
                self.log.error(
                    "Could not delete spool file {path}: {error}; delete it by hand once the "
                    "daemon has stopped",
                    path=path,
                    error=_reason(e),
                )
        self._dir_dirty = True
        self._flush_soon()

    # -- durability ---------------------------------------------------------

    def _flush_soon(self) -> None:
        if self._flush_call is None and self.flush_interval > 0 and self.dirty and not self.closed:
            self._flush_call = self._clock.callLater(self.flush_interval, self._timed_flush)

    def _timed_flush(self) -> None:
        self._flush_call = None
        self._sync(inline=False)

    @property
    def dirty(self) -> bool:
        return bool(self._unsynced) or self._dir_dirty or bool(self._sealed)

    def flush(self) -> None:
        """fsync, here and now, everything written since the last sync, and the directory."""
        self._sync(inline=True)

    def _sync(self, inline: bool) -> None:
        """fsync what changed, and finished files (closing them).

        Off this thread when there is a runner and ``inline`` is False: one
        job at a time (a sync that hangs on a dead network volume must not
        pile up jobs and descriptors), on duplicates of the descriptors.
        """
        if not inline and self._run_blocking is not None:
            if self._syncing:
                self._sync_again = True
                return
            try:
                job = self._take_job(duplicate=True)
            except OSError:
                pass  # no descriptor left to duplicate: sync here rather than not at all
            else:
                if job:
                    self._syncing = True
                    done = self._run_blocking(lambda: sync_job(job))
                    done.addBoth(self._synced)
                return
        self._report_sync(sync_job(self._take_job(duplicate=False)))

    def _take_job(self, duplicate: bool) -> SyncJob:
        job: SyncJob = []
        fds = list(self._unsynced)
        if self._dir_dirty:
            fds.append(self._dir_fd)
        try:
            for fd in fds:
                job.append(
                    (os.dup(fd), self.directory, True) if duplicate else (fd, self.directory, False)
                )
        except OSError:
            for fd, _, _ in job:
                with contextlib.suppress(OSError):
                    os.close(fd)
            raise
        self._unsynced = set()
        self._dir_dirty = False
        job.extend((fd, path, True) for fd, path in self._sealed)
        self._sealed = []
        return job

    def _synced(self, result: SyncErrors | Failure) -> None:
        self._syncing = False
        if isinstance(result, Failure):
            self.log.failure("Unexpected error while syncing the spool", result)
        else:
            self._report_sync(result)
        if self._sync_again:
            self._sync_again = False
            self._flush_soon()

    def _report_sync(self, errors: SyncErrors) -> None:
        for what, path, e in errors:
            if what == "sync":
                self._sync_failed(path, e)
            else:
                self._close_failed(path, e)

    def _sync_failed(self, path: str, e: OSError) -> None:
        suppressed = self._throttle.check("sync failed")
        if suppressed is not None:
            self.log.error(
                "Could not sync the spool ({path}): {error}; what was written stays in the "
                "kernel, but a power loss may cost it. Check the disk{note}",
                path=path,
                error=_errno_text(e),
                note=suppressed_note(suppressed),
            )

    def _close(self, fd: int, path: str) -> None:
        """os.close that cannot fail the caller (an I/O error reported at close, say)."""
        try:
            os.close(fd)
        except OSError as e:
            self._close_failed(path, e)

    def _close_failed(self, path: str, e: OSError) -> None:
        self.close_errors += 1
        suppressed = self._throttle.check("close failed")
        if suppressed is not None:
            self.log.error(
                "Could not close spool file {path}: {error}; going on (check the disk if "
                "this repeats; {count} close errors so far){note}",
                path=path,
                error=_errno_text(e),
                count=self.close_errors,
                note=suppressed_note(suppressed),
            )

    def close(self) -> None:
        """Flush and release the directory; batches not acknowledged stay for the next run."""
        if self.closed:
            return
        write = self._write
        if write is not None:
            self._seal(write, inline=True)
        self.flush()  # here: shutting down, nothing else to wait for
        self.closed = True
        if self._flush_call is not None and self._flush_call.active():
            self._flush_call.cancel()
        self._flush_call = None
        self._close_fds()

    def _close_fds(self) -> None:
        for f in self._files:
            for fd in (f.wfd, f.rfd, f.ack_fd):
                if fd is not None:
                    self._close(fd, f.path)
            f.wfd = f.rfd = f.ack_fd = None
        self._unsynced.clear()
        for fd, path in self._sealed:
            self._close(fd, path)
        self._sealed = []
        for fd in (self._dir_fd, self._lock_fd):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._lock_fd = None


# ---------------------------------------------------------------------------
# Helpers


@dataclass(frozen=True)
class Summary:
    """What a spool directory holds, from a read-only look (see ``inspect``)."""

    files: int
    pending_docs: int
    pending_bytes: int
    disk_bytes: int
    problems: tuple[Problem, ...]


def inspect(directory: str) -> Summary:
    """Count what is waiting in a spool without locking or changing it.

    Safe while a daemon uses the directory (a record being written may show
    as a torn tail).  For tests and for looking at a spool by hand.
    """
    files = pending_docs = pending_bytes = disk_bytes = 0
    problems: list[Problem] = []
    try:
        names = sorted(os.listdir(directory))
    except FileNotFoundError:
        names = []
    for name in names:
        if not _DATA_NAME.fullmatch(name):
            continue
        path = os.path.join(directory, name)
        try:
            fd = os.open(path, os.O_RDONLY | _O_CLOEXEC | _O_NOFOLLOW)
        except FileNotFoundError:
            continue  # deleted meanwhile
        try:
            size = os.fstat(fd).st_size
            ack = _read_small(path[: -len(".xsp")] + ".ack", ACK.size + 1)
            acked_at = (decode_ack(ack) or 0) if ack is not None else 0
            result = walk(lambda off, n: os.pread(fd, n, off), size, acked_at, path)  # noqa: B023
        finally:
            os.close(fd)
        files += 1
        disk_bytes += size
        pending_docs += result.pending_docs
        pending_bytes += result.pending_bytes
        problems.extend(result.problems)
    return Summary(files, pending_docs, pending_bytes, disk_bytes, tuple(problems))


def sync_job(job: SyncJob) -> SyncErrors:
    """fsync each descriptor of ``job`` (closing those it owns); the errors, for the log.

    Touches nothing but its descriptors: it may run in another thread.
    """
    errors: SyncErrors = []
    for fd, path, owned in job:
        try:
            os.fsync(fd)
        except OSError as e:
            errors.append(("sync", path, e))
        if owned:
            try:
                os.close(fd)
            except OSError as e:
                errors.append(("close", path, e))
    return errors


def check_private(directory: str, st: os.stat_result) -> None:
    """Refuse (SpoolError) a directory another user could change, as ssh does for ~/.ssh.

    Whoever can create files in the spool directory can make the daemon
    read forged batches or, through a planted link, write where they choose.
    It must belong to this process's user (or root) and not be writable by
    group or others.
    """
    uid = os.geteuid()
    if st.st_uid not in (uid, 0):
        raise SpoolError(
            f"spool directory {directory} belongs to uid {st.st_uid}, not to this daemon's user "
            f"(uid {uid}), so its owner could change what the daemon reads and writes; "
            f"chown it to uid {uid} or use another directory"
        )
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o022:
        who = {0o020: "its group", 0o002: "all users"}.get(mode & 0o022, "its group and all users")
        raise SpoolError(
            f"spool directory {directory} is writable by {who} (mode {mode:04o}), so another "
            f"user could plant files or links in it; run chmod 700 {directory} or use another "
            "directory"
        )


def _read_small(path: str, limit: int) -> bytes | None:
    """Up to ``limit`` bytes of ``path`` (not following a link); None if it does not exist."""
    try:
        fd = os.open(path, os.O_RDONLY | _O_CLOEXEC | _O_NOFOLLOW)
    except FileNotFoundError:
        return None
    try:
        return os.read(fd, limit)
    finally:
        os.close(fd)


def _open_reason(e: OSError) -> str:
    if e.errno == errno.ELOOP:
        return "it is a symbolic link, which the spool never follows; remove it"
    return _reason(e)


def _lock(directory: str) -> int:
    path = os.path.join(directory, LOCK_NAME)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | _O_CLOEXEC | _O_NOFOLLOW, 0o600)
    except OSError as e:
        raise SpoolError(f"cannot create spool lock file {path}: {_open_reason(e)}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        holder = ""
        with contextlib.suppress(OSError, ValueError):
            pid = int(os.pread(fd, 32, 0).split()[0])
            holder = f" (pid {pid})"
        os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise SpoolError(
                f"spool directory {directory} is in use by another xray daemon{holder}; "
                "give each daemon its own --spool-dir (Spool.Dir)"
            ) from None
        raise SpoolError(f"cannot lock spool directory {directory}: {_reason(e)}") from None
    # Who holds it, for the message above (advisory; the flock is what counts).
    with contextlib.suppress(OSError):
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _write_all(fd: int, parts: list[bytes], size: int) -> None:
    written = os.writev(fd, parts)
    if written < size:
        # A short write (signal, nearly full disk): finish it, or raise.
        rest = b"".join(parts)[written:]
        while rest:
            n = os.write(fd, rest)
            if n == 0:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            rest = rest[n:]


def _reason(e: OSError) -> str:
    return e.strerror or str(e)


def _errno_text(e: OSError) -> str:
    """``[Errno 28] No space left on device``: the number too, for searching."""
    if e.errno is None:
        return str(e)
    return f"[Errno {e.errno}] {e.strerror or os.strerror(e.errno)}"


def _write_advice(e: OSError) -> str:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return "Free disk space there or lower --spool-max-mb (Spool.MaxMB)"
    if e.errno in (errno.EMFILE, errno.ENFILE):
        return "Raise the open-files limit (ulimit -n, systemd LimitNOFILE)"
    return "Check the disk and the permissions of the spool directory"
