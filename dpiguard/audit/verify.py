"""``dpiguard audit verify``: prove that an audit store was not altered.

For each chain (one per instance) it re-reads every segment in seq order and checks, record by record:
the line's hash (any modified byte), the seq (deleted, inserted or reordered records, a missing
segment), the ``prev`` link (the chain), the instance name, and every checkpoint's Ed25519 signature.
At the end, the chain must reach the signed head (``head.json``): a cut tail or a removed last segment
is found there. What a crash (``kill -9``, power loss) leaves is told apart from an alteration and
reported as a note, not a failure: records after the signed head (the last batch, whose head was not
re-signed yet) and an incomplete record at the very end of the last segment (a write that was never
acknowledged). A normal stop (SIGINT/SIGTERM) of any writer signs the head, so there is no such tail. A prune anchor (``pruned.json``, signed) explains a chain that no longer starts at 1.
The first problem of a chain is reported with its file, line and seq; checking that chain stops there
(everything after a break is unproven).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from dpiguard.audit.chain import (
    GENESIS,
    AuditVerifier,
    anchor_message,
    checkpoint_message,
    decode_line,
    head_message,
    list_chains,
    list_segments,
    read_signed_json,
)


@dataclass
class ChainReport:
    chain: str
    instance: str | None = None
    segments: int = 0
    records: int = 0
    first_seq: int | None = None
    last_seq: int = 0
    last_hash: str = GENESIS
    checkpoints: int = 0
    signatures_checked: int = 0
    error: str | None = None
    location: dict[str, Any] | None = None
    warnings: list[str] = field(default_factory=list)
    hashes: dict[int, str] = field(default_factory=dict, repr=False)

    @property
    def ok(self) -> bool:
        return self.error is None

    def fail(self, message: str, path: Path | None = None, line: int | None = None, seq: int | None = None) -> None:
        if self.error is None:
            self.error = message
            self.location = {"file": str(path) if path else None, "line": line, "seq": seq}

    def as_dict(self) -> dict[str, Any]:
        return {"chain": self.chain, "instance": self.instance, "ok": self.ok, "segments": self.segments,
                "records": self.records, "first_seq": self.first_seq, "last_seq": self.last_seq,
                "checkpoints": self.checkpoints, "signatures_checked": self.signatures_checked,
                "error": self.error, "location": self.location, "warnings": self.warnings}

    def describe(self) -> str:
        head = f"chain {self.chain}: "
        if self.ok:
            return (head + f"OK, {self.records} records (seq {self.first_seq}..{self.last_seq}) in {self.segments} "
                    f"segment(s), {self.checkpoints} checkpoint(s), {self.signatures_checked} signature(s) verified")
        loc = self.location or {}
        where = ""
        if loc.get("file"):
            where = f" at {loc['file']}" + (f" line {loc['line']}" if loc.get("line") else "")
        if loc.get("seq") is not None:
            where += f" (seq {loc['seq']})"
        return head + f"FAILED{where}: {self.error}"


def verify_chain(chain: Path, verifier: AuditVerifier | None) -> ChainReport:
    """Verify one chain folder."""
    rep = ChainReport(chain.name)
    expected_seq, expected_prev = 1, GENESIS
    anchor = read_signed_json(chain / "pruned.json")
    if anchor is not None:
        if anchor.get("_invalid"):
            rep.fail("pruned.json is not valid JSON", chain / "pruned.json")
            return rep
        rep.instance = anchor.get("instance")
        if verifier is not None and not verifier.check(
                anchor_message(str(anchor.get("instance")), int(anchor.get("seq", -1)), str(anchor.get("hash"))),
                anchor.get("sig")):
            rep.fail("pruned.json: bad or missing signature (the prune anchor was forged or altered)",
                     chain / "pruned.json")
            return rep
        expected_seq, expected_prev = int(anchor["seq"]) + 1, str(anchor["hash"])
        rep.last_seq, rep.last_hash = int(anchor["seq"]), str(anchor["hash"])
        rep.warnings.append(f"records 1..{anchor['seq']} were pruned on {anchor.get('time')} (signed anchor)")
    segments = list_segments(chain)
    rep.segments = len(segments)
    last_path, last_line = None, None
    for first, path in segments:
        if first != expected_seq:
            if first > expected_seq:
                rep.fail(f"records {expected_seq}..{first - 1} are missing before this segment "
                         f"(segment file deleted?)", path, None, expected_seq)
            else:
                rep.fail(f"segment starts at seq {first} but seq {expected_seq} was expected "
                         f"(overlapping or inserted segment)", path, None, first)
            return rep
        with open(path, "rb") as fh:
            for number, raw in enumerate(fh, 1):
                last_path, last_line = path, number
                if not raw.endswith(b"\n"):
                    if path == segments[-1][1]:
                        # The end of the chain: a write cut by a crash (never acknowledged; the writer
                        # drops it when it reopens the chain). The signed head below says whether
                        # anything acknowledged is missing.
                        rep.warnings.append(f"{len(raw)} byte(s) of an incomplete record at the end of {path.name}: "
                                            "a write cut by a crash or kill (never acknowledged), not an alteration")
                        break
                    rep.fail("incomplete line inside the chain (file cut in the middle of a record)", path, number,
                             expected_seq)
                    return rep
                try:
                    record, hash_ok = decode_line(raw[:-1])
                except (ValueError, orjson.JSONDecodeError) as exc:
                    rep.fail(f"unreadable record ({exc}): modified", path, number, expected_seq)
                    return rep
                seq = record.get("seq")
                if not hash_ok:
                    rep.fail("record content does not match its hash: modified", path, number, seq)
                    return rep
                if seq != expected_seq:
                    if isinstance(seq, int) and seq > expected_seq:
                        why = f"records {expected_seq}..{seq - 1} are missing here (deleted or reordered)"
                    else:
                        why = f"seq {seq} where {expected_seq} was expected (reordered or inserted)"
                    rep.fail(why, path, number, seq)
                    return rep
                if record.get("prev") != expected_prev:
                    rep.fail("the record does not chain to the previous one (inserted, reordered or rewritten)",
                             path, number, seq)
                    return rep
                instance = record.get("instance")
                if rep.instance is None:
                    rep.instance = instance
                elif instance != rep.instance:
                    rep.fail(f"record of instance {instance!r} inside the chain of {rep.instance!r}", path, number, seq)
                    return rep
                if record.get("event") == "checkpoint":
                    rep.checkpoints += 1
                    if verifier is not None:
                        if not verifier.check(checkpoint_message(instance, seq, record["prev"]), record.get("sig")):
                            rep.fail("checkpoint signature is bad or missing (chain rewritten?)", path, number, seq)
                            return rep
                        rep.signatures_checked += 1
                if rep.first_seq is None:
                    rep.first_seq = seq
                rep.records += 1
                expected_seq, expected_prev = seq + 1, record["hash"]
                rep.last_seq, rep.last_hash = seq, record["hash"]
                _remember(rep, seq, record["hash"])
    _check_head(rep, chain, verifier, last_path, last_line)
    return rep


def _remember(rep: ChainReport, seq: int, digest: str) -> None:
    # Keep a bounded window of recent hashes to check a head that lags the chain by a few batches.
    rep.hashes[seq] = digest
    if len(rep.hashes) > 200_000:
        for key in sorted(rep.hashes)[:100_000]:
            del rep.hashes[key]


def _check_head(rep: ChainReport, chain: Path, verifier: AuditVerifier | None, last_path, last_line) -> None:
    head = read_signed_json(chain / "head.json")
    if head is None:
        if rep.records:
            rep.fail("head.json is missing: a cut tail cannot be excluded", chain / "head.json")
        return
    if head.get("_invalid"):
        rep.fail("head.json is not valid JSON", chain / "head.json")
        return
    try:
        seq, digest = int(head["seq"]), str(head["hash"])
    except (KeyError, TypeError, ValueError):
        rep.fail("head.json lacks seq/hash", chain / "head.json")
        return
    if verifier is not None:
        if not verifier.check(head_message(str(head.get("instance")), seq, digest), head.get("sig")):
            rep.fail("head.json: bad or missing signature", chain / "head.json")
            return
        rep.signatures_checked += 1
    if head.get("instance") != rep.instance and rep.instance is not None:
        rep.fail(f"head.json names instance {head.get('instance')!r}", chain / "head.json")
        return
    if seq > rep.last_seq:
        rep.fail(f"the chain ends at seq {rep.last_seq} but the signed head attests seq {seq}: "
                 f"records {rep.last_seq + 1}..{seq} were cut from the end", last_path, last_line, rep.last_seq + 1)
        return
    known = rep.hashes.get(seq)
    if known is None and seq == rep.last_seq:
        known = rep.last_hash
    if known != digest:
        rep.fail(f"record seq {seq} differs from the one the signed head attests", None, None, seq)
        return
    if seq < rep.last_seq:
        rep.warnings.append(f"{rep.last_seq - seq} record(s) after the signed head: the last batch before a crash "
                            "or kill (unsigned tail, expected after a crash; a normal stop signs the head), "
                            "not an alteration")


def verify_store(store: Path, verifier: AuditVerifier | None, instance: str | None = None) -> list[ChainReport]:
    store = Path(store)
    chains = [store] if list_segments(store) else list_chains(store)
    if instance is not None:
        chains = [c for c in chains if c.name == instance]
    reports = []
    for chain in chains:
        rep = verify_chain(chain, verifier)
        rep.hashes = {}
        reports.append(rep)
    return reports


def prune_chain(chain: Path, before: float, signer, verifier: AuditVerifier | None,
                dry_run: bool = False) -> dict[str, Any]:
    """Remove the whole segments of ``chain`` whose last record is older than ``before`` (epoch s).

    The chain is verified first (a broken chain is never pruned: the evidence stays). The active
    (last) segment is never removed. A signed anchor (``pruned.json``: seq and hash of the last pruned
    record) is written durably before any file is deleted, so the rest of the chain still verifies."""
    from dpiguard.audit.chain import anchor_message, fsync_dir, last_complete_line, write_signed_json
    from dpiguard.times import iso_ms, parse_iso_ms

    rep = verify_chain(chain, verifier)
    if not rep.ok:
        raise ValueError(f"refusing to prune a chain that does not verify: {rep.describe()}")
    victims = []
    for _, path in list_segments(chain)[:-1]:
        line, _, _ = last_complete_line(path)
        if line is None:
            break
        record = orjson.loads(line)
        when = parse_iso_ms(record.get("time"))
        if when is None or when >= before:
            break
        victims.append((path, record))
    result = {"chain": chain.name, "files": [p.name for p, _ in victims],
              "up_to_seq": victims[-1][1]["seq"] if victims else None, "dry_run": dry_run}
    if not victims or dry_run:
        return result
    last = victims[-1][1]
    anchor = {"instance": rep.instance, "seq": last["seq"], "hash": last["hash"], "time": iso_ms(),
              "last_pruned_record_time": last.get("time"), "files": result["files"],
              "key_id": signer.key_id, "sig": signer.sign(anchor_message(rep.instance, last["seq"], last["hash"]))}
    write_signed_json(chain / "pruned.json", anchor, durable=True)
    for path, _ in victims:
        path.unlink()
    fsync_dir(chain)
    return result
