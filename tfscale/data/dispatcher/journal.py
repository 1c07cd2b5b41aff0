"""Write-ahead journal and snapshots that make the dispatcher's state durable.

Files, all in one directory:

* `journal-<seq:012d>.log`: log segments, numbered from 1. A record is one line
  `<crc32 of the JSON, 8 lowercase hex digits> <byte length of the JSON> <JSON>\\n`;
  the JSON is compact and ASCII-only, so it holds no newline.
* `snapshot-<seq:012d>.json`: one line in the same framing holding `{"seq": seq, "state": s}`,
  the state after every record of the segments `<= seq`. It is written to `<name>.tmp`,
  fsynced, renamed into place, and the directory fsynced.

A snapshot starts a new segment. The previous snapshot and the segments after it are kept,
so that a corrupt newest snapshot falls back to the previous one; anything older is deleted.
Recovery thus reads one snapshot and one or two segments, never the whole history.

A crash can only tear the last record of the last segment, leaving a final line without
its newline that is a prefix of a record (possibly followed by NUL bytes, where the file
grew but the data never reached the disk): recovery drops it and truncates the file before
it. Anything else raises `JournalCorruptError`, the last line included: a complete line
that does not parse, or a final line that no prefix of a record explains (a flipped
newline, say), may hide records that were acknowledged, and dropping them would let the
dispatcher hand out their fencing tokens again.

`dispatcher.lock` holds an exclusive `flock` while a Journal is recovered and open, and
names its holder (pid, host, address): a second Journal on the same directory, in this
process or another, fails with `WorkDirLockedError` instead of writing the same records.

Group commit: inside `deferred_sync()`, appends are written but not fsynced, and leaving
the context fsyncs everything appended so far; concurrent threads leaving it share fsyncs.
A server that answers a request only after leaving the context keeps its guarantee (no
answer reveals a change a crash could lose) without one fsync per request.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import socket
import threading
import zlib
from typing import Any
from typing import BinaryIO
from typing import Iterator
from typing import Optional

__all__ = [
    "LOCK_FILE",
    "Journal",
    "JournalCorruptError",
    "WorkDirLockedError",
]

Record = dict[str, Any]
State = dict[str, Any]

_SEGMENT = "journal-{:012d}.log"
_SNAPSHOT = "snapshot-{:012d}.json"
_SEGMENT_RE = re.compile(r"journal-(\d{12})\.log")
_SNAPSHOT_RE = re.compile(r"snapshot-(\d{12})\.json")
_TEMP_RE = re.compile(r"snapshot-\d{12}\.json\.tmp")
_FRAME_RE = re.compile(rb"([0-9a-f]{8}) (\d{1,12}) (.*)")
# What a record cut short can look like: part of the checksum, of the length, or of the payload.
_TORN_RE = re.compile(rb"[0-9a-f]{0,8}|[0-9a-f]{8} \d{0,12}|[0-9a-f]{8} (\d{1,12}) (.*)", re.DOTALL)
LOCK_FILE = "dispatcher.lock"


class JournalCorruptError(ValueError):
    """A journal file holds damage that a crash cannot explain."""


class WorkDirLockedError(OSError):
    """Another Journal (another dispatcher) holds the work directory."""


class _DirLock:
    """An exclusive `flock` on `<work_dir>/dispatcher.lock`, which names its holder."""

    def __init__(self, work_dir: str):
        self._path = os.path.join(work_dir, LOCK_FILE)
        self._fd: Optional[int] = None

    def acquire(self) -> None:
        fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip() or "unknown holder"
            os.close(fd)
            raise WorkDirLockedError(
                f"{os.path.dirname(self._path)} is in use by another dispatcher ({holder}); "
                f"one work directory serves one dispatcher at a time (lock: {self._path})"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        self.describe("starting")

    def describe(self, address: str) -> None:
        """Records the holder in the lock file, for the message of the next one."""
        text = f"pid {os.getpid()} on {socket.gethostname()}, {address}\n".encode()
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, text, 0)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # Closing the last descriptor releases the flock.
            self._fd = None


def _encode(obj: dict[str, Any]) -> bytes:
    """Frames `obj` as one record line."""
    try:
        payload = json.dumps(obj, separators=(",", ":"), allow_nan=False).encode("ascii")
    except (TypeError, ValueError) as e:
        raise ValueError(
            f"Records and states must be JSON-serializable. Received: {obj!r} ({e})"
        ) from e
    return b"%08x %d %s\n" % (zlib.crc32(payload), len(payload), payload)


def _decode(line: bytes) -> Optional[dict[str, Any]]:
    """Returns the dict framed in `line` (without its newline), or None if the frame is bad."""
    match = _FRAME_RE.fullmatch(line)
    if match is None:
        return None
    crc, length, payload = match.groups()
    if int(length) != len(payload) or int(crc, 16) != zlib.crc32(payload):
        return None
    try:
        obj = json.loads(payload)
    except ValueError:
        return None
    return obj if isinstance(obj, dict) else None


def _is_torn(tail: bytes) -> bool:
    """Whether `tail`, a final line without its newline, is a record cut short by a crash."""
    written = tail.rstrip(b"\0")
    match = _TORN_RE.fullmatch(written)
    if match is None:
        return False
    length, payload = match.groups()
    if length is None:
        return True
    # A whole record missing only its newline was never acknowledged (no fsync covered it).
    return len(payload) < int(length) or (
        len(payload) == int(length) and _decode(written) is not None
    )


def _read_segment(path: str, is_last: bool) -> tuple[list[Record], int]:
    """Returns the records of a segment and the byte length of its valid prefix."""
    with open(path, "rb") as f:
        data = f.read()
    records = []
    offset = 0
    while offset < len(data):
        end = data.find(b"\n", offset)
        if end < 0 and is_last and _is_torn(data[offset:]):
            break
        record = None if end < 0 else _decode(data[offset:end])
        if record is None:
            what = "Corrupt record" if end >= 0 else "A final line that is not a torn record"
            raise JournalCorruptError(
                f"{what} in {path} at byte offset {offset}. Only a record cut short at the "
                "end of the last segment is dropped on recovery; restore the work directory "
                "from a backup or move it aside."
            )
        records.append(record)
        offset = end + 1
    return records, offset


def _read_snapshot(path: str, seq: int) -> Optional[State]:
    """Returns the state in a snapshot file, or None if the file is damaged."""
    with open(path, "rb") as f:
        data = f.read()
    obj = _decode(data[:-1]) if data.endswith(b"\n") else None
    if obj is None or obj.get("seq") != seq or not isinstance(obj.get("state"), dict):
        return None
    return obj["state"]


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Journal:
    """Write-ahead log of JSON records with CRC32 checksums, plus periodic snapshots.

    Call `recover()` once, first; then `append()` each state change and, when
    `should_snapshot()`, write the whole state with `snapshot()`. Methods are thread-safe.
    Threads that append concurrently can share fsyncs with `deferred_sync()`.

    Args:
      work_dir: the directory of the journal (created if missing). One Journal at a time:
        `recover()` locks it until `close()`.
      fsync: whether `append()` fsyncs, making a record durable when it returns.
      snapshot_every: records after which `should_snapshot()` turns true.

    Example:

    ```python
    with Journal("/tmp/dispatcher") as journal:
        state, records = journal.recover()
        state = replay(state or {}, records)
        journal.append({"op": "lease", "shard": 3, "worker": "w0"})
        if journal.should_snapshot():
            journal.snapshot(state)
    ```
    """

    def __init__(self, work_dir: str, *, fsync: bool = True, snapshot_every: int = 1000):
        if type(snapshot_every) is not int or snapshot_every < 1:
            raise ValueError(f"snapshot_every must be an int >= 1. Received: {snapshot_every=}")
        self._dir = work_dir
        self._fsync = fsync
        self._snapshot_every = snapshot_every
        self._lock = threading.Lock()
        self._file: Optional[BinaryIO] = None  # The active segment, once recovered.
        self._segment = 0  # Sequence number of the active segment.
        self._base = 0  # Sequence number of the snapshot the state rests on; 0: none.
        self._since_snapshot = 0
        self._recovered = False
        self._closed = False
        self._failure: Optional[BaseException] = None
        self._written = 0  # Bytes written since this object opened its first segment.
        self._synced = 0  # How many of those are durable.
        self._sync_lock = threading.Lock()  # Held by the thread running a group fsync.
        self._deferring = threading.local()
        self._dir_lock = _DirLock(work_dir)

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    @property
    def records_since_snapshot(self) -> int:
        """Records appended (or replayed by `recover()`) since the latest snapshot."""
        return self._since_snapshot

    def should_snapshot(self) -> bool:
        """Whether `snapshot_every` records have accumulated since the latest snapshot."""
        return self._since_snapshot >= self._snapshot_every

    def recover(self) -> tuple[Optional[State], list[Record]]:
        """Loads the durable state; must be called once, before anything else.

        Returns:
          The latest valid snapshot's state (None if there is none) and the records
          appended after it, in order.

        Raises:
          JournalCorruptError: a record is damaged in a way a crash cannot explain, or
            no snapshot is usable.
          WorkDirLockedError: another Journal holds the directory.
        """
        with self._lock:
            self._check_open()
            if self._recovered:
                raise RuntimeError(f"recover() was called already on {self._dir}.")
            os.makedirs(self._dir, exist_ok=True)
            self._dir_lock.acquire()
            try:
                return self._recover_locked()
            except BaseException:
                self._dir_lock.release()
                raise

    def mark_holder(self, address: str) -> None:
        """Names what holds the directory (e.g. "serving 127.0.0.1:5000") in its lock file."""
        with self._lock:
            self._check_ready()
            self._dir_lock.describe(address)

    def _recover_locked(self) -> tuple[Optional[State], list[Record]]:
        """Recovers the state; the caller holds the directory lock."""
        for name in os.listdir(self._dir):
            if _TEMP_RE.fullmatch(name):
                os.remove(os.path.join(self._dir, name))
        segments = self._list(_SEGMENT_RE)
        self._base, state = self._load_base(segments)
        tail = [seq for seq in segments if seq > self._base]
        records = []
        for seq in tail:
            records.extend(self._replay(seq, is_last=seq == tail[-1]))
        self._open_segment(max(tail, default=self._base + 1))
        self._since_snapshot = len(records)
        self._recovered = True
        return state, records

    def append(self, record: Record) -> None:
        """Appends one record; with `fsync=True` it is durable when this returns.

        Inside `deferred_sync()` it is durable when the context exits instead.
        """
        self.append_many([record])

    def append_many(self, records: list[Record]) -> None:
        """Appends records with one write and one fsync (group commit).

        A crash in the middle loses a suffix of the batch, never a record in between.
        """
        for record in records:
            if not isinstance(record, dict):
                raise ValueError(f"Records must be dicts. Received: record={record!r}")
        data = b"".join(_encode(record) for record in records)
        with self._lock:
            self._check_ready()
            if data:
                self._write(data, sync=self._fsync and not self._deferred())
            self._since_snapshot += len(records)

    @contextlib.contextmanager
    def deferred_sync(self) -> Iterator[None]:
        """Defers the fsync of this thread's appends to the exit of the context.

        On exit, `sync()` makes every record appended so far durable, by this thread or
        any other, so whatever the caller saw of state built from records is durable
        too; the exit raises if that fails. Concurrent threads share fsyncs.
        """
        outer = self._deferred()
        self._deferring.active = True
        try:
            yield
        finally:
            self._deferring.active = outer
            self.sync()

    def sync(self) -> None:
        """Makes every record appended so far durable, sharing fsyncs between threads.

        A thread that finds another's fsync running waits for it; once it returns, the
        records that fsync covered need no other.
        """
        target = self._written
        if not self._fsync or self._synced >= target:
            return
        with self._sync_lock:
            with self._lock:
                if self._synced >= target:  # An fsync since the call covered them.
                    return
                self._check_ready()
                written = self._written
                fd = os.dup(self._file.fileno())  # A snapshot may close the segment meanwhile.
            try:
                os.fsync(fd)
            except BaseException as e:
                with self._lock:
                    self._failure = e
                raise
            finally:
                os.close(fd)
            with self._lock:
                self._synced = max(self._synced, written)

    def snapshot(self, state: State) -> None:
        """Atomically makes `state` the new snapshot and starts a new segment.

        `state` must reflect every record appended so far. Segments and snapshots that
        neither the new snapshot nor the previous one needs are deleted.
        """
        if not isinstance(state, dict):
            raise ValueError(f"state must be a dict. Received: state={state!r}")
        with self._lock:
            self._check_ready()
            try:
                self._roll(state)
            except BaseException as e:
                self._failure = e
                raise

    def _roll(self, state: State) -> None:
        """Writes the snapshot of the active segment, then opens the next segment."""
        self._write(b"", sync=True)  # Segments before a snapshot hold no torn tail.
        seq = self._segment
        self._write_snapshot(seq, _encode({"seq": seq, "state": state}))
        previous, self._base = self._base, seq
        self._open_segment(seq + 1)
        self._since_snapshot = 0
        self._prune(keep_snapshots={previous, seq}, first_segment=previous + 1)

    def close(self) -> None:
        """Flushes and closes the active segment; safe to call twice."""
        with self._lock:
            try:
                if self._file is not None and self._failure is None:
                    self._write(b"", sync=self._fsync)
            finally:
                if self._file is not None:
                    self._file.close()
                self._file = None
                self._closed = True
                self._dir_lock.release()

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"The journal on {self._dir} is closed.")

    def _check_ready(self) -> None:
        self._check_open()
        if not self._recovered:
            raise RuntimeError(f"recover() must be called first on {self._dir}.")
        if self._failure is not None:
            raise RuntimeError(f"A write failed ({self._failure!r}); recover in a new Journal.")

    def _deferred(self) -> bool:
        """Whether this thread is inside `deferred_sync()`."""
        return getattr(self._deferring, "active", False)

    def _path(self, pattern: str, seq: int) -> str:
        return os.path.join(self._dir, pattern.format(seq))

    def _list(self, regex: re.Pattern[str]) -> list[int]:
        """Sequence numbers of the files whose names match `regex`, ascending."""
        matches = (regex.fullmatch(name) for name in os.listdir(self._dir))
        return sorted(int(match.group(1)) for match in matches if match)

    def _load_base(self, segments: list[int]) -> tuple[int, Optional[State]]:
        """Picks the newest valid snapshot whose following segments all exist."""
        problems = []
        for seq in reversed([0] + self._list(_SNAPSHOT_RE)):
            if not set(range(seq + 1, max(segments, default=0) + 1)) <= set(segments):
                after = self._path(_SNAPSHOT, seq) if seq else "the start"
                problems.append(f"segments after {after} are missing")
                continue
            if seq == 0:
                return 0, None
            state = _read_snapshot(self._path(_SNAPSHOT, seq), seq)
            if state is not None:
                return seq, state
            problems.append(f"{self._path(_SNAPSHOT, seq)} is corrupt")
        raise JournalCorruptError(f"No usable snapshot in {self._dir}: {'; '.join(problems)}.")

    def _replay(self, seq: int, is_last: bool) -> list[Record]:
        """Reads one segment, truncating a torn tail of the last one."""
        path = self._path(_SEGMENT, seq)
        records, valid_bytes = _read_segment(path, is_last)
        if valid_bytes < os.path.getsize(path):
            with open(path, "r+b") as f:
                f.truncate(valid_bytes)
                os.fsync(f.fileno())
        return records

    def _open_segment(self, seq: int) -> None:
        if self._file is not None:
            self._file.close()
        self._file = open(self._path(_SEGMENT, seq), "ab")
        self._segment = seq
        if self._fsync:
            _fsync_dir(self._dir)

    def _write(self, data: bytes, sync: bool) -> None:
        """Writes to the active segment; after a failure the segment is unusable."""
        try:
            self._file.write(data)
            self._file.flush()
            self._written += len(data)
            if sync:
                os.fsync(self._file.fileno())
                self._synced = self._written
        except BaseException as e:
            self._failure = e
            raise

    def _write_snapshot(self, seq: int, data: bytes) -> None:
        path = self._path(_SNAPSHOT, seq)
        with open(path + ".tmp", "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(path + ".tmp", path)
        _fsync_dir(self._dir)

    def _prune(self, keep_snapshots: set[int], first_segment: int) -> None:
        for seq in self._list(_SNAPSHOT_RE):
            if seq not in keep_snapshots:
                os.remove(self._path(_SNAPSHOT, seq))
        for seq in self._list(_SEGMENT_RE):
            if seq < first_segment:
                os.remove(self._path(_SEGMENT, seq))
