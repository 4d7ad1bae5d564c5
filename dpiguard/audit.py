"""Decision trace: one JSON line (orjson) per decision, login event and refusal.

Each record is appended with a single ``write(2)`` on a file opened with ``O_APPEND``, so concurrent
writers (threads, or several processes sharing a file) never interleave partial lines, and a record
that was written survives a crash of the proxy process. If the file cannot be written, ``write``
raises :class:`AuditError` and the caller refuses the request: no access without its trace.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import orjson

#: Fields every decision record carries (None when not applicable), in this order.
DECISION_FIELDS = (
    "time", "event", "instance", "request_id", "outcome", "reason", "user", "roles", "units",
    "patient", "category", "action", "method", "path", "route", "client", "policy_version", "detail",
)


class AuditError(RuntimeError):
    """The trace could not be written; the request must be refused."""


def utc_now_ms(now: float | None = None) -> str:
    t = time.time() if now is None else now
    seconds = int(t)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{int((t - seconds) * 1000):03d}Z"


class AuditLog:
    """Append-only JSON-lines writer, safe to share between threads."""

    def __init__(self, path: str | Path, instance_id: str):
        self.path = Path(path)
        self.instance_id = instance_id
        self._lock = threading.Lock()
        self._fd: int | None = None
        self.records_written = 0
        self.errors = 0

    def open(self) -> "AuditLog":
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        except OSError as exc:
            raise AuditError(f"cannot open audit log {self.path}: {exc}") from exc
        return self

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def write(self, record: dict[str, Any]) -> None:
        """Append one record. ``time`` and ``instance`` are added. Raises AuditError on failure."""
        record.setdefault("time", utc_now_ms())
        record["instance"] = self.instance_id
        try:
            line = orjson.dumps(record, option=orjson.OPT_APPEND_NEWLINE | orjson.OPT_NON_STR_KEYS)
        except (TypeError, orjson.JSONEncodeError) as exc:
            self.errors += 1
            raise AuditError(f"audit record not serializable: {exc}") from exc
        with self._lock:
            if self._fd is None:
                self.errors += 1
                raise AuditError("audit log is not open")
            try:
                view = memoryview(line)
                while view:
                    written = os.write(self._fd, view)
                    view = view[written:]
            except OSError as exc:
                self.errors += 1
                # Last resort so that the operator sees it even though the trace file failed.
                print(f"dpiguard: AUDIT WRITE FAILED ({exc}); refusing requests", file=sys.stderr)
                raise AuditError(f"cannot write audit log {self.path}: {exc}") from exc
            self.records_written += 1


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """Read every record of a trace file (for tests and simple tools)."""
    out = []
    with open(path, "rb") as fh:
        for line in fh:
            line = line.strip()
            if line:
                out.append(orjson.loads(line))
    return out
