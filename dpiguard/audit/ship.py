"""Several instances, one central store: ``dpiguard audit ship`` and ``dpiguard audit collect``.

- **ship** (on each proxy host) copies the local chains' records, byte for byte, into one Redis Stream
  per chain, ``P:audit:stream:{INSTANCE}``, with the entry id ``<seq>-0`` (so a replay can never
  duplicate an entry: Redis refuses an id that is not above the stream's last one). It ships only up
  to the signed head (records known durable) and attaches the head to the last entry. Its position is
  re-read from Redis at every pass: the stream's last id, or ``P:audit:collected:{INSTANCE}`` (the
  collector's durable position) when the stream was trimmed or lost. After a Redis outage, even one
  that lost recent writes, it simply ships again from what Redis still has.
- **collect** (one process, central) appends each stream's records to a central store with the same
  layout as a local one (``<store>/<instance>/NNNNNNNNNNNN.jsonl`` + ``head.json``), so
  ``dpiguard audit verify --dir <store>`` checks it with the same public key. Its position is the last
  record of the central chain itself (fsync'ed before Redis is told), so a crash or an outage resumes
  exactly there: entries at or below it are skipped (no duplicate), an entry that does not continue
  the chain (hash, seq) is never written. If the stream has a hole (Redis lost entries), the collector
  deletes the stream and records its position, and the shipper re-sends from there.

The local files remain the source of truth; Redis only carries records between them.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import orjson
import redis

from dpiguard.audit.chain import (
    AuditError,
    decode_line,
    fsync_dir,
    last_complete_line,
    list_chains,
    list_segments,
    read_signed_json,
    segment_name,
)
from dpiguard.storage.batch import is_cluster
from dpiguard.storage.keys import Keys

log = logging.getLogger("dpiguard.audit")


def _seq_of(entry_id: bytes | str) -> int:
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    return int(text.split("-", 1)[0])


# -- shipper ----------------------------------------------------------------------------------------

class Shipper:
    def __init__(self, client: redis.Redis, store: Path, prefix: str = "dpiguard", batch: int = 500):
        self.r = client
        self.store = Path(store)
        self.prefix = prefix
        self.keys = Keys(prefix)
        self.batch = batch
        self._hint: dict[str, tuple[Path, int, int]] = {}  # chain -> (segment, byte offset, seq before it)

    def position(self, chain: str) -> int:
        last = self.r.xrevrange(self.keys.audit_stream(chain), count=1)
        shipped = _seq_of(last[0][0]) if last else 0
        collected = int(self.r.get(self.keys.audit_collected(chain)) or 0)
        return max(shipped, collected)

    def ship_once(self) -> int:
        """One pass over every local chain; returns the number of records added to Redis."""
        total = 0
        for chain in list_chains(self.store):
            total += self._ship_chain(chain)
        return total

    def _ship_chain(self, chain: Path) -> int:
        head = read_signed_json(chain / "head.json")
        if not head or head.get("_invalid"):
            return 0
        head_seq = int(head["seq"])
        name = chain.name
        self.r.sadd(self.keys.audit_chains, name)
        pos = self.position(name)
        if pos >= head_seq:
            return 0
        key = self.keys.audit_stream(name)
        sent = 0
        pipe = self.r.pipeline(transaction=False)
        pending = 0
        for seq, line in self._lines_after(chain, pos, head_seq):
            fields = {"l": line}
            if seq == head_seq:
                fields["h"] = orjson.dumps(head)
            pipe.xadd(key, fields, id=f"{seq}-0")
            pending += 1
            if pending >= self.batch:
                sent += self._flush(pipe)
                pending = 0
        if pending:
            sent += self._flush(pipe)
        return sent

    @staticmethod
    def _flush(pipe) -> int:
        ok = 0
        for result in pipe.execute(raise_on_error=False):
            if isinstance(result, Exception):
                if "equal or smaller" in str(result):
                    continue  # already there (another pass or a concurrent shipper): never duplicated
                raise result
            ok += 1
        return ok

    def _lines_after(self, chain: Path, pos: int, head_seq: int):
        segments = list_segments(chain)
        start = [s for s in segments if s[0] <= pos + 1]
        if not start:
            if segments and segments[0][0] > pos + 1:
                raise AuditError(f"chain {chain.name}: records {pos + 1}..{segments[0][0] - 1} are no longer on "
                                 f"disk (pruned before they were collected)")
            return
        begin = segments.index(start[-1])
        hint = self._hint.get(chain.name)
        for first, path in segments[begin:]:
            offset = 0
            if hint and hint[0] == path and hint[2] <= pos:
                offset = hint[1]
            with open(path, "rb") as fh:
                fh.seek(offset)
                for raw in fh:
                    if not raw.endswith(b"\n"):
                        return
                    seq = int(raw[7:raw.index(b",", 7)]) if raw.startswith(b'{"seq":') else None
                    offset += len(raw)
                    if seq is None:
                        raise AuditError(f"{path}: unreadable line")
                    if seq > head_seq:
                        return
                    if seq > pos:
                        self._hint[chain.name] = (path, offset, seq)
                        yield seq, raw[:-1]


# -- collector --------------------------------------------------------------------------------------

class CentralChain:
    """The central copy of one chain: appends verified lines, fsyncs, knows its tail."""

    def __init__(self, folder: Path, rotate_bytes: int):
        self.folder = folder
        self.rotate_bytes = rotate_bytes
        folder.mkdir(parents=True, exist_ok=True)
        self.seq, self.hash, self.fd, self.size = 0, "0" * 64, None, 0
        self.instance: str | None = None
        segments = list_segments(folder)
        for _, path in reversed(segments):
            line, offset, size = last_complete_line(path)
            if offset < size:  # an unfinished append of ours (never acknowledged): drop it
                with open(path, "r+b") as fh:
                    fh.truncate(offset)
            if line is not None:
                record, ok = decode_line(line)
                if not ok:
                    raise AuditError(f"central chain {folder} ends with a corrupt record")
                self.seq, self.hash, self.instance = int(record["seq"]), record["hash"], record.get("instance")
                self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
                self.size = os.fstat(self.fd).st_size
                break

    def append(self, lines: list[bytes], head: bytes | None) -> None:
        if not lines:
            return
        if self.fd is None or self.size >= self.rotate_bytes:
            first = orjson.loads(lines[0])["seq"]
            if self.fd is not None:
                os.close(self.fd)
            self.fd = os.open(self.folder / segment_name(first), os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC,
                              0o640)
            self.size = 0
            fsync_dir(self.folder)
        data = b"".join(line + b"\n" for line in lines)
        os.write(self.fd, data)
        os.fdatasync(self.fd)
        self.size += len(data)
        if head is not None:
            tmp = self.folder / "head.json.tmp"
            tmp.write_bytes(head)
            os.replace(tmp, self.folder / "head.json")


class Collector:
    def __init__(self, client: redis.Redis, store: Path, prefix: str = "dpiguard", rotate_bytes: int = 64 << 20):
        self.r = client
        self.store = Path(store)
        self.prefix = prefix
        self.keys = Keys(prefix)
        self.rotate_bytes = rotate_bytes
        self.chains: dict[str, CentralChain] = {}
        self.problems: dict[str, str] = {}

    def chain(self, name: str) -> CentralChain:
        if name not in self.chains:
            self.chains[name] = CentralChain(self.store / name, self.rotate_bytes)
        return self.chains[name]

    def collect_once(self, block_ms: int = 500, count: int = 2000) -> int:
        names = sorted(n.decode() for n in self.r.smembers(self.keys.audit_chains))
        if not names:
            time.sleep(block_ms / 1000)
            return 0
        streams = {self.keys.audit_stream(n): f"{self.chain(n).seq}-0" for n in names}
        if is_cluster(self.r):
            # Each chain's stream is in its own slot and one XREAD reads one slot: ask each stream
            # without blocking (one pipelined round trip per node), then wait if nothing came.
            pipe = self.r.pipeline(transaction=False)
            for key, last in streams.items():
                pipe.xread({key: last}, count=count)
            reply = [item for answer in pipe.execute() for item in (answer or [])]
            if not reply:
                time.sleep(block_ms / 1000)
        else:
            reply = self.r.xread(streams, count=count, block=block_ms) or []
        written = 0
        for key, entries in reply:
            key = key.decode() if isinstance(key, bytes) else key
            name = key[key.index("{") + 1:-1]
            written += self._apply(name, entries)
        return written

    def _apply(self, name: str, entries) -> int:
        chain = self.chain(name)
        lines, head = [], None
        seq, prev = chain.seq, chain.hash
        hole = False
        for entry_id, fields in entries:
            entry_seq = _seq_of(entry_id)
            if entry_seq <= seq:
                continue  # already in the central store
            line = fields[b"l"]
            record, ok = decode_line(line)
            if entry_seq != seq + 1 or record.get("seq") != entry_seq:
                hole = True
                break
            if not ok or record.get("prev") != prev or (chain.instance and record.get("instance") != chain.instance):
                self.problems[name] = f"record seq {entry_seq} does not continue the central chain; not written"
                log.error("dpiguard audit collect: %s: %s", name, self.problems[name])
                break
            lines.append(line)
            seq, prev = entry_seq, record["hash"]
            chain.instance = chain.instance or record.get("instance")
            head = fields.get(b"h", head)
        chain.append(lines, head)
        chain.seq, chain.hash = seq, prev
        pipe = self.r.pipeline(transaction=False)
        pipe.set(self.keys.audit_collected(name), seq)
        if hole:
            # Redis lost entries (outage without persistence): make the shipper send again from here.
            pipe.delete(self.keys.audit_stream(name))
        else:
            pipe.xtrim(self.keys.audit_stream(name), minid=f"{seq}-0")
        pipe.execute()
        return len(lines)


def stats(store: Path) -> dict[str, Any]:
    return {c.name: (read_signed_json(c / "head.json") or {}).get("seq") for c in list_chains(store)}
