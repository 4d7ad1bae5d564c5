"""The audit chain: tamper evidence across rotated files, explicit prune, recovery, write failures."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import orjson
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from dpiguard.audit.chain import (
    AuditError,
    AuditLog,
    AuditSigner,
    AuditVerifier,
    encode_line,
    iter_chain,
    list_segments,
    read_records,
)
from dpiguard.audit.verify import prune_chain, verify_store

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def key():
    return Ed25519PrivateKey.generate()


def make_chain(store: Path, key, records: int = 40, instance: str = "px1", **kw) -> Path:
    opts = dict(rotate_bytes=2500, checkpoint_records=9)
    opts.update(kw)
    with AuditLog(store, instance, signer=AuditSigner(key), **opts) as log:
        for i in range(records):
            log.write({"event": "access", "outcome": "allow", "reason": "allowed", "user": f"u{i % 3}",
                       "patient": f"P{i:04d}", "request_id": f"r{i:04d}"})
    return store / instance


def verify(store: Path, key):
    reports = verify_store(store, AuditVerifier(key.public_key()))
    assert len(reports) == 1
    return reports[0]


def nonempty_segments(chain: Path) -> list[tuple[int, Path]]:
    return [(first, p) for first, p in list_segments(chain) if p.stat().st_size]


def lines_of(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def test_untouched_chain_verifies_across_rotated_segments(tmp_path, key):
    chain = make_chain(tmp_path, key)
    segments = list_segments(chain)
    assert len(segments) >= 3, "the test needs several rotated segments"
    rep = verify(tmp_path, key)
    assert rep.ok, rep.describe()
    assert rep.records == rep.last_seq and rep.checkpoints >= 4
    assert rep.signatures_checked >= rep.checkpoints + 1  # checkpoints + head
    # Each segment after the first begins where the previous one ended.
    for (first, path), (nxt, _) in zip(segments, segments[1:]):
        assert orjson.loads(lines_of(path)[-1])["seq"] == nxt - 1


def test_flipped_byte_is_found_and_located(tmp_path, key):
    chain = make_chain(tmp_path, key)
    _, path = list_segments(chain)[1]
    data = bytearray(path.read_bytes())
    lines = lines_of(path)
    offset = len(lines[0]) + len(lines[1]) + lines[2].index(b'"patient":"P') + 12
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))
    rep = verify(tmp_path, key)
    assert not rep.ok
    assert rep.location["file"] == str(path) and rep.location["line"] == 3
    assert "modified" in rep.error


def test_deleted_line_is_found(tmp_path, key):
    chain = make_chain(tmp_path, key)
    _, path = list_segments(chain)[0]
    lines = lines_of(path)
    removed = orjson.loads(lines[4])["seq"]
    path.write_bytes(b"".join(lines[:4] + lines[5:]))
    rep = verify(tmp_path, key)
    assert not rep.ok and rep.location["line"] == 5
    assert f"records {removed}..{removed}" in rep.error


def test_swapped_lines_are_found(tmp_path, key):
    chain = make_chain(tmp_path, key)
    _, path = list_segments(chain)[1]
    lines = lines_of(path)
    lines[2], lines[3] = lines[3], lines[2]
    path.write_bytes(b"".join(lines))
    rep = verify(tmp_path, key)
    assert not rep.ok and rep.location == {"file": str(path), "line": 3, "seq": orjson.loads(lines[2])["seq"]}


def test_inserted_line_is_found(tmp_path, key):
    chain = make_chain(tmp_path, key)
    _, path = list_segments(chain)[0]
    lines = lines_of(path)
    path.write_bytes(b"".join(lines[:3] + [lines[2]] + lines[3:]))
    rep = verify(tmp_path, key)
    assert not rep.ok and rep.location["line"] == 4
    assert "reordered or inserted" in rep.error


def test_rewritten_chain_fails_on_checkpoint_signature(tmp_path, key):
    """An attacker who recomputes every hash after an edit still cannot sign a checkpoint."""
    from dpiguard.audit.chain import decode_line, encode_line

    chain = make_chain(tmp_path, key, records=12, rotate_bytes=1 << 20)
    _, path = list_segments(chain)[0]
    out, prev = [], "0" * 64
    for raw in lines_of(path):
        rec, _ = decode_line(raw.rstrip(b"\n"))
        if rec.get("patient") == "P0002":
            rec["patient"] = "P9999"
        seq = rec.pop("seq")
        rec.pop("prev"), rec.pop("hash")
        line, prev = encode_line(seq, orjson.dumps(rec), prev)
        out.append(line)
    path.write_bytes(b"".join(out))
    rep = verify(tmp_path, key)
    assert not rep.ok and "checkpoint signature" in rep.error
    # Without signatures the rewrite would go unnoticed: that is why checkpoints are signed.
    assert verify_store(tmp_path, None)[0].error.startswith("record seq")


def test_cut_tail_is_found(tmp_path, key):
    chain = make_chain(tmp_path, key)
    _, path = nonempty_segments(chain)[-1]
    lines = lines_of(path)
    path.write_bytes(b"".join(lines[:-2]))
    rep = verify(tmp_path, key)
    assert not rep.ok and "cut from the end" in rep.error
    assert rep.location["file"] == str(path)


def test_tail_cut_mid_line_is_found(tmp_path, key):
    chain = make_chain(tmp_path, key)
    _, path = nonempty_segments(chain)[-1]
    data = path.read_bytes()
    path.write_bytes(data[:-20])
    rep = verify(tmp_path, key)
    # An acknowledged record (the signed head attests it) is cut: an alteration, not a crash tail.
    assert not rep.ok and ("cut from the end" in rep.error or "incomplete line inside the chain" in rep.error)


def test_a_crash_tail_is_reported_as_such_not_as_an_alteration(tmp_path, key):
    """After a crash, records may follow the signed head (the last batch) and the very last one may be
    cut mid-line (never acknowledged): verify passes with notes. The same records altered: it fails."""
    chain = make_chain(tmp_path, key)
    head = orjson.loads((chain / "head.json").read_bytes())
    _, path = list_segments(chain)[-1]
    prev = head["hash"]
    tail = b""
    for seq in range(head["seq"] + 1, head["seq"] + 4):  # three records the head never attested
        line, prev = encode_line(seq, orjson.dumps({"time": "2026-01-01T00:00:00.000Z", "instance": head["instance"],
                                                     "event": "access", "outcome": "allow"}), prev)
        tail += line
    partial, _ = encode_line(head["seq"] + 4, orjson.dumps({"instance": head["instance"], "event": "access"}), prev)
    with open(path, "ab") as f:
        f.write(tail + partial[:25])  # and a write cut in the middle
    rep = verify(tmp_path, key)
    assert rep.ok, rep.error
    notes = " ".join(rep.warnings)
    assert "3 record(s) after the signed head" in notes and "crash" in notes and "not an alteration" in notes
    assert "incomplete record at the end" in notes
    # The same tail with one byte changed in an attested record: an alteration.
    data = path.read_bytes()
    at = data.index(b'"patient":"P0002"') if b'"patient":"P0002"' in data else data.index(b'"outcome":"allow"')
    path.write_bytes(data[:at] + data[at:].replace(b"allow", b"alloW", 1))
    assert not verify(tmp_path, key).ok


@pytest.mark.parametrize("which", [0, 1, -1])
def test_dropped_segment_is_found(tmp_path, key, which):
    chain = make_chain(tmp_path, key)
    segments = nonempty_segments(chain)
    first, path = segments[which]
    path.unlink()
    rep = verify(tmp_path, key)
    assert not rep.ok
    if which == -1:
        assert "cut from the end" in rep.error
    else:
        assert f"records {first}.." in rep.error and "missing" in rep.error


def test_deleted_head_is_found(tmp_path, key):
    chain = make_chain(tmp_path, key)
    (chain / "head.json").unlink()
    assert "head.json is missing" in verify(tmp_path, key).error


def test_prune_keeps_chain_verifiable_and_anchor_is_signed(tmp_path, key):
    chain = make_chain(tmp_path, key)
    segments = list_segments(chain)
    result = prune_chain(chain, before=4e9, signer=AuditSigner(key), verifier=AuditVerifier(key.public_key()))
    assert result["files"] == [p.name for _, p in segments[:-1]]  # never the active segment
    assert [p for _, p in list_segments(chain)] == [segments[-1][1]]
    rep = verify(tmp_path, key)
    assert rep.ok, rep.describe()
    assert rep.first_seq == segments[-1][0] and "pruned" in rep.warnings[0]
    # The writer continues the chain after a prune.
    with AuditLog(tmp_path, "px1", signer=AuditSigner(key)) as log:
        log.write({"event": "after_prune"})
    assert verify(tmp_path, key).ok
    # A forged anchor (moved further) is refused: it is signed.
    anchor = orjson.loads((chain / "pruned.json").read_bytes())
    anchor["seq"] += 1
    (chain / "pruned.json").write_bytes(orjson.dumps(anchor))
    assert "pruned.json: bad or missing signature" in verify(tmp_path, key).error


def test_prune_refuses_a_broken_chain(tmp_path, key):
    chain = make_chain(tmp_path, key)
    _, path = list_segments(chain)[0]
    path.write_bytes(b"".join(lines_of(path)[1:]))
    with pytest.raises(ValueError, match="does not verify"):
        prune_chain(chain, before=4e9, signer=AuditSigner(key), verifier=AuditVerifier(key.public_key()))
    assert path.exists()


def test_torn_tail_is_removed_at_start_and_recorded(tmp_path, key):
    chain = make_chain(tmp_path, key, records=5)
    _, path = nonempty_segments(chain)[-1]
    with open(path, "ab") as fh:
        fh.write(b'{"seq":999,"time":"unfinished')  # a write that never completed (power loss)
    with AuditLog(tmp_path, "px1", signer=AuditSigner(key)) as log:
        log.write({"event": "next"})
    records = read_records(tmp_path)
    recovery = [r for r in records if r["event"] == "audit_recovery"]
    assert len(recovery) == 1 and "never acknowledged" in recovery[0]["detail"]
    assert verify(tmp_path, key).ok


def test_writer_refuses_a_chain_shorter_than_its_head(tmp_path, key):
    chain = make_chain(tmp_path, key, records=5)
    _, path = nonempty_segments(chain)[-1]
    path.write_bytes(b"".join(lines_of(path)[:-1]))
    with pytest.raises(AuditError, match="signed head attests"):
        AuditLog(tmp_path, "px1", signer=AuditSigner(key)).open()


def test_one_writer_per_chain(tmp_path, key):
    with AuditLog(tmp_path, "px1", signer=AuditSigner(key)):
        with pytest.raises(AuditError, match="another process"):
            AuditLog(tmp_path, "px1", signer=AuditSigner(key)).open()


def test_concurrent_threads_share_group_commits(tmp_path, key):
    import threading

    log = AuditLog(tmp_path, "px1", signer=AuditSigner(key)).open()
    futures = []
    lock = threading.Lock()

    def worker(n):
        for i in range(200):
            f = log.submit({"event": "access", "w": n, "i": i})
            with lock:
                futures.append(f)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for f in futures:
        f.result(10)
    batches = log.batches
    log.close()
    assert batches < 800  # several records per fsync
    assert sum(1 for r in read_records(tmp_path) if r["event"] == "access") == 800
    assert verify(tmp_path, key).ok


def test_write_failure_fails_the_future_then_leaves_a_gap_record(tmp_path, key):
    """A real EFBIG (file size limit) makes writes fail; once writable again, the gap is recorded."""
    script = textwrap.dedent(f"""
        import resource, sys
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
        from dpiguard.audit.chain import AuditLog, AuditError, AuditSigner
        log = AuditLog({str(tmp_path)!r}, "px1", rotate_bytes=1 << 30).open()
        log.write({{"event": "before"}})
        size = (log.chain / "000000000001.jsonl").stat().st_size
        resource.setrlimit(resource.RLIMIT_FSIZE, (size + 10, resource.RLIM_INFINITY))
        failed = 0
        for i in range(3):
            try:
                log.write({{"event": "during", "i": i}})
            except AuditError:
                failed += 1
        assert not log.writable
        resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        log.write({{"event": "after"}})
        assert log.writable
        log.close()
        print(failed)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "3"
    events = [r["event"] for _, _, r in iter_chain(tmp_path / "px1")]  # chain order
    assert "during" not in events
    assert events[:3] == ["before", "audit_gap", "after"]
    gap = [r for r in read_records(tmp_path) if r["event"] == "audit_gap"][0]
    assert gap["lost"] == 3
    assert verify_store(tmp_path, None)[0].ok


def test_cli_verify_names_the_place(tmp_path, key, capsys):
    from cryptography.hazmat.primitives import serialization

    from dpiguard.cli import main

    chain = make_chain(tmp_path / "audit", key)
    pub = tmp_path / "audit.pub.pem"
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo))
    args = ["audit", "verify", "--dir", str(tmp_path / "audit"), "--public-key", str(pub)]
    assert main(args) == 0
    assert "audit trail OK" in capsys.readouterr().out
    _, path = list_segments(chain)[1]
    lines = lines_of(path)
    path.write_bytes(b"".join(lines[:1] + lines[2:]))
    assert main(args) == 1
    out = capsys.readouterr().out
    assert f"FAILED at {path} line 2" in out and "AUDIT TRAIL ALTERED" in out
    assert main(args + ["--json"]) == 1
    data = orjson.loads(capsys.readouterr().out)
    assert data["ok"] is False and data["chains"][0]["location"]["line"] == 2
    os.environ.pop("DPIGUARD_CONFIG", None)
    assert main(["audit", "verify", "--dir", str(tmp_path / "audit")]) == 2


def test_record_time_text_is_exact_with_its_per_second_reuse():
    """iso_ms reuses the text of the current second: every instant still formats as strftime does."""
    import random
    import time

    from dpiguard.times import iso_ms

    rng = random.Random(4)
    base = 1_767_225_599.0  # a second before 2026-01-01T00:00:00Z: the reuse must follow second changes
    for t in [base + i / 7 for i in range(30)] + [rng.uniform(0, 4e9) for _ in range(2000)]:
        seconds = int(t)
        expected = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{int((t - seconds) * 1000):03d}Z"
        assert iso_ms(t) == expected
