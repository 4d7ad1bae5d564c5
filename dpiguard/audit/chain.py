"""Tamper-evident, durable audit trail: one hash chain of orjson lines per instance.

Store layout (``audit.path`` is a folder; see docs/audit.md)::

    <audit.path>/<instance>/000000000001.jsonl   segments, each named by the seq of its first record
    <audit.path>/<instance>/head.json            signed head: seq and hash of the last durable record
    <audit.path>/<instance>/pruned.json          signed anchor left by ``dpiguard audit prune``
    <audit.path>/<instance>/.lock                held (flock) by the one process writing this chain

Every line is ``{"seq":N, ...fields..., "prev":"<hash of record N-1>", "hash":"<sha256>"}`` where the
hash is the SHA-256 of the line's bytes up to ``"prev":"…"}`` (the ``hash`` member removed), so a
verifier recomputes it byte for byte. Segments continue the chain (the first record of a segment
chains the last record of the previous one). Every ``checkpoint_records`` records or
``checkpoint_seconds`` seconds, and at rotation and close, a ``checkpoint`` record carries an Ed25519
signature over (instance, seq, prev); the head file is re-signed after every durable batch. The
signing key lives outside the log folder (``audit.signing_key_file``, created by ``dpiguard keys init``).

Durability: :meth:`AuditLog.submit` queues a record and returns a future shared by its batch; a writer
thread appends the batch with one ``write`` and one ``fdatasync`` (group commit) and then resolves the
future. :meth:`AuditLog.write` is the blocking form for threads and command-line tools. A record is
answered only once it is on disk; if the disk refuses, the future fails with :class:`AuditError` and the
caller refuses the request. Bytes of a failed batch are truncated away (they were never acknowledged)
and the next successful batch starts with an ``audit_gap`` record counting what could not be written.
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import os
import re
import sys
import threading
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Iterator

import orjson
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from dpiguard.signing import key_id
from dpiguard.times import iso_ms, parse_iso_ms

#: Fields every access record carries (None when not applicable), see docs/audit.md.
DECISION_FIELDS = (
    "seq", "time", "instance", "event", "request_id", "outcome", "reason", "user", "roles", "units",
    "patient", "category", "action", "method", "path", "fhir_type", "fhir_id", "break_glass",
    "break_glass_reason", "client", "policy_version", "detail", "prev", "hash",
)

GENESIS = "0" * 64
SEGMENT_RE = re.compile(r"^(\d{12})\.jsonl$")
RESERVED = ("seq", "prev", "hash")
_HASH_TAIL = re.compile(rb',"hash":"([0-9a-f]{64})"\}$')
MAX_BACKLOG = 200_000


class AuditError(RuntimeError):
    """The trace could not be written; the request must be refused."""


def safe_instance(instance: str) -> str:
    """The folder name of an instance's chain (letters, digits, '.', '_', '-')."""
    name = re.sub(r"[^A-Za-z0-9._-]", "_", instance or "unnamed")[:128]
    return "_" + name[1:] if name.startswith(".") else name


def segment_name(first_seq: int) -> str:
    return f"{first_seq:012d}.jsonl"


# -- encoding ---------------------------------------------------------------------------------------

def encode_line(seq: int, fields_json: bytes, prev: str) -> tuple[bytes, str]:
    """One chained line (with newline) and its hash. ``fields_json`` is an orjson object, not empty."""
    body = b'{"seq":%d,%s,"prev":"%s"}' % (seq, fields_json[1:-1], prev.encode())
    digest = hashlib.sha256(body).hexdigest()
    return body[:-1] + b',"hash":"' + digest.encode() + b'"}\n', digest


def decode_line(line: bytes) -> tuple[dict[str, Any], bool]:
    """Parse one line (without newline); returns (record, hash_ok). Raises ValueError if malformed."""
    m = _HASH_TAIL.search(line)
    if m is None:
        raise ValueError("no hash member at the end of the line")
    record = orjson.loads(line)
    if not isinstance(record, dict):
        raise ValueError("not a JSON object")
    body = line[:m.start()] + b"}"
    return record, hashlib.sha256(body).hexdigest() == m.group(1).decode()


# -- signatures -------------------------------------------------------------------------------------

def checkpoint_message(instance: str, seq: int, prev: str) -> bytes:
    return f"dpiguard-audit-checkpoint|{instance}|{seq}|{prev}".encode()


def head_message(instance: str, seq: int, digest: str) -> bytes:
    return f"dpiguard-audit-head|{instance}|{seq}|{digest}".encode()


def anchor_message(instance: str, seq: int, digest: str) -> bytes:
    return f"dpiguard-audit-pruned|{instance}|{seq}|{digest}".encode()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class AuditSigner:
    """Ed25519 key that signs checkpoints, heads and prune anchors."""

    def __init__(self, private: Ed25519PrivateKey):
        self.private = private
        self.key_id = key_id(private.public_key())

    @classmethod
    def from_pem_file(cls, path: str | os.PathLike) -> "AuditSigner":
        try:
            key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
        except (OSError, ValueError) as exc:
            raise AuditError(f"cannot load audit signing key {path}: {exc}") from exc
        if not isinstance(key, Ed25519PrivateKey):
            raise AuditError(f"{path} is not an Ed25519 private key")
        return cls(key)

    def sign(self, message: bytes) -> str:
        return _b64(self.private.sign(message))


class AuditVerifier:
    def __init__(self, public: Ed25519PublicKey):
        self.public = public
        self.key_id = key_id(public)

    @classmethod
    def from_pem_file(cls, path: str | os.PathLike) -> "AuditVerifier":
        key = serialization.load_pem_public_key(Path(path).read_bytes())
        if not isinstance(key, Ed25519PublicKey):
            raise ValueError(f"{path} is not an Ed25519 public key")
        return cls(key)

    def check(self, message: bytes, signature: str | None) -> bool:
        if not signature:
            return False
        try:
            self.public.verify(_unb64(signature), message)
            return True
        except Exception:
            return False


def public_key_path(private_path: Path) -> Path:
    return private_path.with_name(private_path.name.removesuffix(".pem") + ".pub.pem")


# -- files ------------------------------------------------------------------------------------------

def list_segments(chain: Path) -> list[tuple[int, Path]]:
    out = []
    try:
        entries = list(chain.iterdir())
    except FileNotFoundError:
        return []
    for p in entries:
        m = SEGMENT_RE.match(p.name)
        if m:
            out.append((int(m.group(1)), p))
    return sorted(out)


def list_chains(store: Path) -> list[Path]:
    store = Path(store)
    if not store.is_dir():
        return []
    return sorted(p for p in store.iterdir() if p.is_dir() and not p.name.startswith("."))


def last_complete_line(path: Path) -> tuple[bytes | None, int, int]:
    """(last complete line, offset after it, file size). A partial tail is beyond the offset."""
    size = path.stat().st_size
    if size == 0:
        return None, 0, 0
    with open(path, "rb") as fh:
        chunk = 1 << 16
        pos = size
        buf = b""
        while pos > 0:
            start = max(0, pos - chunk)
            fh.seek(start)
            buf = fh.read(pos - start) + buf
            pos = start
            end = buf.rfind(b"\n")
            if end < 0:
                continue
            begin = buf.rfind(b"\n", 0, end)
            if begin >= 0 or pos == 0:
                return buf[begin + 1:end], pos + end + 1, size
        return None, 0, size


def _first_line(path: Path) -> bytes | None:
    with open(path, "rb") as fh:
        line = fh.readline()
    return line.rstrip(b"\n") if line.endswith(b"\n") else None


def read_signed_json(path: Path) -> dict[str, Any] | None:
    try:
        data = orjson.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except orjson.JSONDecodeError:
        return {"_invalid": True}
    return data if isinstance(data, dict) else {"_invalid": True}


def write_signed_json(path: Path, data: dict[str, Any], durable: bool) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o640)
    try:
        os.write(fd, orjson.dumps(data))
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    if durable:
        fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- the writer -------------------------------------------------------------------------------------

#: Longest time the signed head file may lag the chain (it is re-signed at most this often, and at
#: every checkpoint, rotation and close). Tail truncation is detected for records older than this.
HEAD_INTERVAL = 0.5

class AuditLog:
    """Group-commit writer of one instance's chain; safe to share between threads."""

    def __init__(
        self,
        path: str | Path,
        instance_id: str,
        *,
        signer: AuditSigner | None = None,
        rotate_bytes: int = 64 << 20,
        rotate_seconds: float = 86400.0,
        checkpoint_records: int = 1000,
        checkpoint_seconds: float = 60.0,
        max_wait_ms: float = 0.0,
        max_batch: int = 1024,
        fsync: bool = True,
        lock_timeout: float = 0.0,
        write_timeout: float = 10.0,
    ):
        self.store = Path(path)
        self.instance_id = instance_id
        self.chain = self.store / safe_instance(instance_id)
        self.signer = signer
        self.rotate_bytes = rotate_bytes
        self.rotate_seconds = rotate_seconds
        self.checkpoint_records = checkpoint_records
        self.checkpoint_seconds = checkpoint_seconds
        self.max_wait = max_wait_ms / 1000.0
        self.max_batch = max_batch
        self.fsync = fsync
        self.lock_timeout = lock_timeout
        self.write_timeout = write_timeout
        self._cond = threading.Condition()
        self._queue: list[bytes] = []
        self._future: Future = Future()
        self._stopping = False
        # Deferred wake-up (see :meth:`wake_later`): records queued by one thread (the proxy's event loop)
        # wake the writer once per scheduling round instead of once per record.
        self._defer_thread: int | None = None
        self._defer: Any = None
        self._wake_pending = False
        self._thread: threading.Thread | None = None
        self._fd: int | None = None
        self._lock_fd: int | None = None
        # chain state (writer thread only, after open)
        self._seq = 0
        self._prev = GENESIS
        self._size = 0
        self._segment: Path | None = None
        self._segment_started = 0.0
        self._cp_seq = 0
        self._cp_time = 0.0
        self._head_seq = 0  # seq the signed head file covers
        self._head_time = 0.0
        self._lost = 0
        self._lost_since: str | None = None
        self.last_error: str | None = None
        self.writable = False
        self.records_written = 0
        self.batches = 0
        self.fsyncs = 0  # fdatasync calls, and the time they took (metrics: mean fsync latency)
        self.fsync_seconds = 0.0
        self.errors = 0

    # -- lifecycle ---------------------------------------------------------------------------------
    def open(self) -> "AuditLog":
        try:
            self.chain.mkdir(parents=True, exist_ok=True, mode=0o750)
            self._acquire_lock()
            torn = self._recover()
        except OSError as exc:
            self._release_lock()
            raise AuditError(f"cannot open audit chain {self.chain}: {exc}") from exc
        except AuditError:
            self._release_lock()
            raise
        self.writable = True
        self._cp_time = time.monotonic()
        self._thread = threading.Thread(target=self._run, name=f"audit-{self.instance_id}", daemon=True)
        self._thread.start()
        if torn:
            self.submit({"event": "audit_recovery", "outcome": "error", "reason": "torn_tail",
                         "detail": f"{torn} byte(s) of an unfinished write (never acknowledged) were removed "
                                   f"from the end of {self._segment.name} at start-up"})
        return self

    def _acquire_lock(self) -> None:
        self._lock_fd = os.open(self.chain / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
        deadline = time.monotonic() + self.lock_timeout
        while True:
            try:
                fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise AuditError(f"audit chain {self.chain} is being written by another process "
                                     f"(instance ids must be unique)") from None
                time.sleep(0.05)

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing releases the flock
            self._lock_fd = None

    def _recover(self) -> int:
        """Find the chain's tail; remove an unacknowledged torn line. Returns the bytes removed."""
        segments = list_segments(self.chain)
        anchor = read_signed_json(self.chain / "pruned.json")
        if anchor and not anchor.get("_invalid"):
            self._seq, self._prev = int(anchor["seq"]), str(anchor["hash"])
        torn = 0
        if segments:
            first, path = segments[-1]
            line, offset, size = last_complete_line(path)
            if offset < size:
                with open(path, "r+b") as fh:
                    fh.truncate(offset)
                    os.fsync(fh.fileno())
                torn = size - offset
            if line is not None:
                record, ok = decode_line(line)
                if not ok:
                    raise AuditError(f"last record of {path} fails its hash; run 'dpiguard audit verify'")
                self._seq, self._prev = int(record["seq"]), record["hash"]
                first_line = _first_line(path)
                started = parse_iso_ms(orjson.loads(first_line).get("time")) if first_line else None
                self._segment_started = started or time.time()
            else:
                if len(segments) > 1:
                    prev_line, _, _ = last_complete_line(segments[-2][1])
                    if prev_line is not None:
                        record, _ = decode_line(prev_line)
                        self._seq, self._prev = int(record["seq"]), record["hash"]
                if self._seq + 1 != first:
                    raise AuditError(f"empty segment {path} does not continue the chain at seq {self._seq + 1}")
                self._segment_started = time.time()
            self._segment = path
        head = read_signed_json(self.chain / "head.json")
        if head and not head.get("_invalid") and int(head.get("seq", 0)) > self._seq:
            raise AuditError(f"audit chain {self.chain} ends at seq {self._seq} but its signed head attests seq "
                             f"{head['seq']}: records were removed; run 'dpiguard audit verify' and move the chain "
                             f"folder aside to start a new one")
        self._cp_seq = self._seq
        if self._segment is None:
            self._open_segment(self._seq + 1)
        else:
            self._fd = os.open(self._segment, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
            self._size = os.fstat(self._fd).st_size
        return torn

    def _open_segment(self, first_seq: int) -> None:
        path = self.chain / segment_name(first_seq)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o640)
        if self.fsync:
            fsync_dir(self.chain)
        if self._fd is not None:
            os.close(self._fd)
        self._fd, self._segment, self._size = fd, path, os.fstat(fd).st_size
        self._segment_started = time.time()

    def close(self) -> None:
        thread = self._thread
        if thread is not None:
            with self._cond:
                self._stopping = True
                self._cond.notify()
            thread.join(30)
            self._thread = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self.writable = False
        self._release_lock()

    def __enter__(self) -> "AuditLog":
        return self.open()

    def __exit__(self, *exc) -> None:
        self.close()

    # -- API ---------------------------------------------------------------------------------------
    def submit(self, record: dict[str, Any], *, _wait: bool = False) -> Future:
        """Queue a record; the returned future resolves (to the batch's last seq) once it is on disk,
        or fails with AuditError. ``time`` and ``instance`` are added. Raises AuditError at once if
        the record cannot be serialized or the log is closed or hopelessly behind."""
        record.setdefault("time", iso_ms())
        record["instance"] = self.instance_id
        for key in RESERVED:
            record.pop(key, None)
        try:
            data = orjson.dumps(record, option=orjson.OPT_NON_STR_KEYS)
        except (TypeError, orjson.JSONEncodeError) as exc:
            self.errors += 1
            raise AuditError(f"audit record not serializable: {exc}") from exc
        with self._cond:
            if self._thread is None or self._stopping:
                self.errors += 1
                raise AuditError("audit log is not open")
            if len(self._queue) >= MAX_BACKLOG:
                self.errors += 1
                raise AuditError("audit writer is too far behind")
            self._queue.append(data)
            future = self._future
            defer = False
            if len(self._queue) >= self.max_batch:
                self._cond.notify()
            elif len(self._queue) == 1:
                if self._defer is not None and not _wait and threading.get_ident() == self._defer_thread:
                    defer, self._wake_pending = not self._wake_pending, True
                else:
                    self._cond.notify()
        if defer:
            try:
                self._defer(self._wake)
            except Exception:  # the scheduler is gone (loop closed): wake the writer now
                self._wake()
        return future

    def wake_later(self, schedule: Any) -> None:
        """Records submitted from the calling thread (the proxy's event loop) wake the writer through
        ``schedule(callback)`` (``loop.call_soon``), once per round of the loop, so the records of all the
        requests a round handles go in one batch, for one thread wake-up, one write and one fsync.
        Nothing is ever left unwritten by this: the writer also wakes on its own within a second."""
        with self._cond:
            self._defer_thread, self._defer = threading.get_ident(), schedule

    def _wake(self) -> None:
        with self._cond:
            self._wake_pending = False
            if self._queue:
                self._cond.notify()

    def write(self, record: dict[str, Any]) -> None:
        """Append one record and wait until it is durable. Raises AuditError on failure."""
        future = self.submit(record, _wait=True)  # the caller blocks: the writer is woken now
        try:
            future.result(self.write_timeout)
        except AuditError:
            raise
        except Exception as exc:
            raise AuditError(f"audit write not confirmed: {exc!r}") from exc

    def queue_depth(self) -> int:
        """Records submitted and not yet written (metrics)."""
        return len(self._queue)

    def status(self) -> dict[str, Any]:
        return {"writable": self.writable, "chain": str(self.chain), "seq": self._seq,
                "records_written": self.records_written, "batches": self.batches,
                "lost": self._lost, "last_error": self.last_error}

    # -- writer thread -----------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cond:
                if not self._queue and not self._stopping:
                    self._cond.wait(self._idle_timeout())
                if self._queue and self.max_wait > 0 and not self._stopping:
                    deadline = time.monotonic() + self.max_wait
                    while len(self._queue) < self.max_batch and not self._stopping:
                        remaining = deadline - time.monotonic()
                        if remaining <= 0:
                            break
                        self._cond.wait(remaining)
                batch, future = self._queue, self._future
                if batch:
                    self._queue, self._future = [], Future()
                stopping = self._stopping and not self._queue
            try:
                if batch:
                    self._commit(batch, future)
                self._maintenance(final=stopping)
            except Exception as exc:  # the writer must survive anything
                self.last_error = f"{type(exc).__name__}: {exc}"
                print(f"dpiguard: audit writer error: {self.last_error}", file=sys.stderr)
                if batch and not future.done():
                    future.set_exception(AuditError(self.last_error))
            if stopping:
                return

    def _idle_timeout(self) -> float:
        timeout = 1.0
        if self._seq > self._head_seq:  # the head lags: catch it up soon
            timeout = min(timeout, max(0.01, self._head_time + HEAD_INTERVAL - time.monotonic()))
        if self._seq > self._cp_seq:
            timeout = min(timeout, max(0.01, self._cp_time + self.checkpoint_seconds - time.monotonic()))
        return timeout

    def _checkpoint_fields(self, seq: int, prev: str) -> bytes:
        sig = self.signer.sign(checkpoint_message(self.instance_id, seq, prev)) if self.signer else None
        return orjson.dumps({"time": iso_ms(), "instance": self.instance_id, "event": "checkpoint",
                             "outcome": "allow", "reason": "checkpoint",
                             "key_id": self.signer.key_id if self.signer else None, "sig": sig})

    def _commit(self, batch: list[bytes], future: Future | None, force_checkpoint: bool = False) -> bool:
        if self._lost:
            gap = orjson.dumps({"time": iso_ms(), "instance": self.instance_id, "event": "audit_gap",
                                "outcome": "error", "reason": "audit_unavailable", "lost": self._lost,
                                "detail": f"{self._lost} record(s) could not be written since {self._lost_since}: "
                                          f"{self.last_error}"})
            batch = [gap] + batch
        seq, prev = self._seq, self._prev
        cp_seq = self._cp_seq
        lines = []
        for fields in batch:
            seq += 1
            line, prev = encode_line(seq, fields, prev)
            lines.append(line)
            if seq - cp_seq >= self.checkpoint_records:
                seq += 1
                line, prev = encode_line(seq, self._checkpoint_fields(seq, prev), prev)
                lines.append(line)
                cp_seq = seq
        if force_checkpoint and seq > cp_seq:
            seq += 1
            line, prev = encode_line(seq, self._checkpoint_fields(seq, prev), prev)
            lines.append(line)
            cp_seq = seq
        data = b"".join(lines)
        try:
            if data:
                if self._fd is None:  # rotated: the next segment is created with its first record
                    self._open_segment(self._seq + 1)
                view = memoryview(data)
                while view:
                    view = view[os.write(self._fd, view):]
                if self.fsync:
                    started = time.perf_counter()
                    os.fdatasync(self._fd)
                    self.fsync_seconds += time.perf_counter() - started
                    self.fsyncs += 1
        except OSError as exc:
            try:
                if self._fd is not None:
                    os.ftruncate(self._fd, self._size)  # unacknowledged bytes never stay in the chain
            except OSError:
                pass
            lost = len(batch) - (1 if self._lost else 0)
            if not self._lost:
                self._lost_since = iso_ms()
            self._lost += lost
            self.errors += 1
            self.writable = False
            self.last_error = f"{type(exc).__name__}: {exc}"
            print(f"dpiguard: AUDIT WRITE FAILED ({self.last_error}); refusing requests", file=sys.stderr)
            if future is not None and not future.done():
                future.set_exception(AuditError(f"cannot write audit chain {self._segment}: {exc}"))
            return False
        if cp_seq != self._cp_seq:
            self._cp_time = time.monotonic()
        self._seq, self._prev, self._cp_seq = seq, prev, cp_seq
        self._size += len(data)
        self._lost, self._lost_since = 0, None
        self.writable = True
        self.records_written += len(lines)
        self.batches += 1
        if future is not None and not future.done():
            future.set_result(seq)
        if force_checkpoint or time.monotonic() - self._head_time >= HEAD_INTERVAL:
            self._refresh_head(durable=force_checkpoint)
        return True

    def _refresh_head(self, durable: bool) -> None:
        """Re-sign the head (last seq + hash). Throttled to HEAD_INTERVAL: an Ed25519 signature and a
        file replace per batch would cost more CPU than the request itself under load."""
        self._head_time = time.monotonic()
        try:
            self._write_head(durable=durable)
            self._head_seq = self._seq
        except OSError as exc:
            self.last_error = f"head not written: {exc}"

    def _write_head(self, durable: bool) -> None:
        data = {"instance": self.instance_id, "seq": self._seq, "hash": self._prev, "segment": self._segment.name,
                "time": iso_ms(), "key_id": self.signer.key_id if self.signer else None,
                "sig": self.signer.sign(head_message(self.instance_id, self._seq, self._prev)) if self.signer else None}
        write_signed_json(self.chain / "head.json", data, durable and self.fsync)

    def _maintenance(self, final: bool) -> None:
        now = time.monotonic()
        if self._seq > self._head_seq and now - self._head_time >= HEAD_INTERVAL and self._fd is not None:
            self._refresh_head(durable=False)
        rotate = self._size >= self.rotate_bytes or (
            self._size > 0 and time.time() - self._segment_started >= self.rotate_seconds)
        due = self._seq > self._cp_seq and now - self._cp_time >= self.checkpoint_seconds
        if final or rotate or due:
            if self._seq > self._cp_seq or final:
                if not self._commit([], None, force_checkpoint=True):
                    return
            if rotate and not final and self._fd is not None:
                os.close(self._fd)
                self._fd, self._size = None, 0


# -- readers ----------------------------------------------------------------------------------------

def iter_chain(chain: Path) -> Iterator[tuple[Path, int, dict[str, Any]]]:
    """(segment, line number, record) for every complete, parseable line of a chain, in file order."""
    for _, path in list_segments(chain):
        with open(path, "rb") as fh:
            for number, line in enumerate(fh, 1):
                if not line.endswith(b"\n"):
                    break
                try:
                    record = orjson.loads(line)
                except orjson.JSONDecodeError:
                    continue
                if isinstance(record, dict):
                    yield path, number, record


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """Every record of an audit store (all chains, ordered by time) or of one JSON-lines file."""
    path = Path(path)
    if path.is_dir():
        chains = [path] if list_segments(path) else list_chains(path)
        out = [rec for chain in chains for _, _, rec in iter_chain(chain)]
        out.sort(key=lambda r: r.get("time") or "")
        return out
    out = []
    with open(path, "rb") as fh:
        for line in fh:
            line = line.strip()
            if line:
                out.append(orjson.loads(line))
    return out


# -- construction from configuration ----------------------------------------------------------------

def from_config(cfg, instance_id: str | None = None, *, lock_timeout: float = 0.0) -> AuditLog:
    """An (unopened) AuditLog for ``cfg`` (a dpiguard Config)."""
    a = cfg.audit
    key_path = cfg.path(a.signing_key_file)
    signer = AuditSigner.from_pem_file(key_path) if key_path.is_file() else None
    return AuditLog(
        cfg.path(a.path), instance_id or cfg.instance_id, signer=signer,
        rotate_bytes=a.rotate_bytes, rotate_seconds=float(a.rotate_seconds),
        checkpoint_records=a.checkpoint_records, checkpoint_seconds=a.checkpoint_seconds,
        max_wait_ms=a.group_commit_ms, max_batch=a.group_commit_max, lock_timeout=lock_timeout,
    )


def admin_log(cfg) -> AuditLog:
    """The chain of management commands run on this host (``cli-<hostname>``), opened."""
    import socket

    return from_config(cfg, f"cli-{socket.gethostname()}", lock_timeout=15.0).open()
