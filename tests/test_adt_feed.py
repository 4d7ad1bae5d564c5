"""The ADT feed against a real Redis-protocol server and real TCP sockets (MLLP)."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import pytest
import redis

from dpiguard.audit.chain import AuditLog, read_records
from dpiguard.careteam.adt import Movement, ParseOptions
from dpiguard.careteam.mllp import AdtProcessor, ListenerSettings, MllpServer
from dpiguard.careteam.movements import MovementStore
from dpiguard.careteam.store import CareTeamStore
from dpiguard.storage import clients as redisconn
from dpiguard.storage.keys import Keys

from .hl7msgs import adt, mllp_exchange, msa, read_ack, send_on

pytestmark = pytest.mark.timeout(60)
T0 = float(int(time.time()) - 3600)


class Listener:
    def __init__(self, redis_url: str, audit_path, **settings):
        self.client = redisconn.from_url(redis_url)
        self.store = MovementStore(self.client, dedup_ttl=3600)
        self.audit = AuditLog(audit_path, "adt-test").open()
        self.audit_path = audit_path
        self.settings = ListenerSettings(port=0, **settings)
        self.loop = asyncio.new_event_loop()
        self.server = MllpServer(AdtProcessor(self.store, self.audit, ParseOptions(timezone="UTC")), self.settings)
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.server.start(), self.loop).result(10)
        self.port = self.server.port

    def send(self, message) -> list[str]:
        return msa(mllp_exchange(self.port, message))

    def close(self):
        asyncio.run_coroutine_threadsafe(self.server.stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.audit.close()


@pytest.fixture
def feed(r, redis_url, tmp_path):
    listener = Listener(redis_url, tmp_path / "audit.jsonl", max_message_bytes=4096, read_timeout=1.0)
    yield listener
    listener.close()


def stays(r, patient="P0001"):
    ct = CareTeamStore(r)
    return [(s["unit"], s["start"], s["end"]) for s in ct.patient_stays(patient)]


def member(r, login, patient, now, grace=60):
    return CareTeamStore(r, grace_seconds=grace).membership(login, patient, now).member


def test_admit_transfer_cancel_over_mllp(feed, r):
    ct = CareTeamStore(r)
    ct.add_unit_member("inf.a", "CARDIO")
    ct.add_unit_member("inf.b", "PNEUMO")
    assert feed.send(adt("A01", unit="CARDIO", at=T0, control_id="M1"))[1] == "AA"
    assert stays(r) == [("CARDIO", T0, None)]
    assert member(r, "inf.a", "P0001", T0 + 10) and not member(r, "inf.b", "P0001", T0 + 10)
    assert feed.send(adt("A02", unit="PNEUMO", at=T0 + 100, control_id="M2"))[1] == "AA"
    # A keeps access for the grace period after the transfer time, B at once.
    assert member(r, "inf.a", "P0001", T0 + 100 + 60) and not member(r, "inf.a", "P0001", T0 + 100 + 61)
    assert member(r, "inf.b", "P0001", T0 + 100)
    assert feed.send(adt("A12", unit="PNEUMO", at=T0 + 100, control_id="M3"))[1] == "AA"
    assert stays(r) == [("CARDIO", T0, None)]
    assert r.smembers("dpiguard:ct:unit-patients:PNEUMO") == set()
    assert r.smembers("dpiguard:ct:unit-patients:CARDIO") == {b"P0001"}
    recs = [x for x in read_records(feed.audit_path) if x["event"] == "adt_message"]
    assert [(x["message_control_id"], x["event_type"], x["outcome"], x["patient"]) for x in recs] == [
        ("M1", "A01", "applied", "P0001"), ("M2", "A02", "applied", "P0001"), ("M3", "A12", "applied", "P0001")]


def test_duplicates_are_applied_once(feed, r):
    m = adt("A01", unit="CARDIO", at=T0, control_id="DUP1")
    assert feed.send(m)[1] == "AA"
    assert feed.send(adt("A03", at=T0 + 50, control_id="DUP2"))[1] == "AA"
    entries = r.xlen("dpiguard:ct:journal")
    again = feed.send(m)  # the admission again (the PAS did not get our ACK): no new stay
    assert again[1] == "AA" and "duplicate" in again[3]
    assert stays(r) == [("CARDIO", T0, T0 + 50)]
    assert r.xlen("dpiguard:ct:journal") == entries
    assert read_records(feed.audit_path)[-1]["outcome"] == "duplicate"
    # The same admission with a new control id is a real conflict: refused, nothing changes.
    code = feed.send(adt("A01", unit="CARDIO", at=T0, control_id="DUP3"))
    assert code[1] == "AE" and "already exists" in code[3]


def test_out_of_order_discharge_does_not_end_the_current_stay(feed, r):
    assert feed.send(adt("A01", unit="CARDIO", at=T0))[1] == "AA"
    assert feed.send(adt("A02", unit="PNEUMO", at=T0 + 200))[1] == "AA"
    ack = feed.send(adt("A03", at=T0 + 100))  # sent before the transfer, arrives after
    assert ack[1] == "AE" and "out of order" in ack[3]
    assert stays(r) == [("CARDIO", T0, T0 + 200), ("PNEUMO", T0 + 200, None)]
    rec = read_records(feed.audit_path)[-1]
    assert rec["outcome"] == "rejected" and rec["ack"] == "AE"


def test_malformed_input_gets_error_ack_or_close_and_listener_keeps_serving(feed, r):
    # Not HL7 at all, inside a frame: AR.
    assert feed.send(b"hello world")[1] == "AR"
    # Wrong encoding characters: AR, with the control id echoed.
    bad = adt("A01", control_id="ENC1").replace("MSH|^~\\&|", "MSH|^^^^|", 1)
    ack = feed.send(bad)
    assert ack[1] == "AR" and ack[2] == "ENC1"
    # Not valid UTF-8 although declared so: AR.
    assert feed.send(adt("A01").replace("MARTIN", "H\udce9L").encode("utf-8", "surrogateescape"))[1] == "AR"
    # Unsupported event: AR with code 201.
    ack = mllp_exchange(feed.port, adt("A28"))
    assert msa(ack)[1] == "AR" and "ERR|||201^^HL70357" in ack
    # Too large: AR then the connection is closed.
    with socket.create_connection(("127.0.0.1", feed.port), timeout=5) as sock:
        ack = send_on(sock, adt("A01", extra=["NTE|1||" + "x" * 5000]))
        assert msa(ack)[1] == "AR" and "larger" in msa(ack)[3]
        assert sock.recv(10) == b""
    # Garbage outside a frame: connection closed, no ACK.
    with socket.create_connection(("127.0.0.1", feed.port), timeout=5) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\n\r\n")
        assert sock.recv(100) == b""
    # Truncated frame (connection closed mid-message): nothing applied.
    with socket.create_connection(("127.0.0.1", feed.port), timeout=5) as sock:
        sock.sendall(b"\x0b" + adt("A01", patient="P0009").encode()[:60])
    # A frame that never ends: closed after read_timeout.
    with socket.create_connection(("127.0.0.1", feed.port), timeout=5) as sock:
        sock.sendall(b"\x0b" + adt("A01", patient="P0009").encode())
        assert sock.recv(100) == b""
    assert stays(r, "P0009") == []
    # Still serving, and several messages on one connection work.
    with socket.create_connection(("127.0.0.1", feed.port), timeout=5) as sock:
        assert msa(send_on(sock, adt("A01", at=T0)))[1] == "AA"
        assert msa(send_on(sock, adt("A03", at=T0 + 10)))[1] == "AA"
    assert stays(r) == [("CARDIO", T0, T0 + 10)]
    rejected = [x for x in read_records(feed.audit_path) if x["outcome"] == "rejected"]
    assert len(rejected) == 5


def test_pipelined_frames_in_one_packet(feed, r):
    with socket.create_connection(("127.0.0.1", feed.port), timeout=5) as sock:
        data = b"".join(b"\x0b" + m.encode() + b"\x1c\r" for m in (
            adt("A01", at=T0), adt("A02", unit="PNEUMO", at=T0 + 5)))
        sock.sendall(data)
        assert msa(read_ack(sock))[1] == "AA"
        assert msa(read_ack(sock))[1] == "AA"
    assert stays(r) == [("CARDIO", T0, T0 + 5), ("PNEUMO", T0 + 5, None)]


def test_redis_down_gives_ae_and_nothing_applied(tmp_path):
    dead = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2, socket_timeout=0.2)
    audit = AuditLog(tmp_path / "a.jsonl", "x").open()
    processor = AdtProcessor(MovementStore(dead), audit, ParseOptions())
    ack = processor.handle(adt("A01").encode())
    fields = msa(ack.decode())
    assert fields[1] == "AE" and "resend" in fields[3]
    assert read_records(tmp_path / "a.jsonl")[-1]["outcome"] == "rejected"


def test_movement_publishes_patient_invalidation(r, redis_url):
    sub = redisconn.from_url(redis_url).pubsub()
    sub.subscribe(Keys("dpiguard").events)
    sub.get_message(timeout=1)
    MovementStore(r).apply(Movement("X1", "PAS", "A01", "P5", "V5", "CARDIO", T0))
    msg = sub.get_message(timeout=2)
    assert msg and msg["data"] == b"patient:P5"
    sub.close()


def test_replay_rebuilds_state_and_keeps_manual_stays(r):
    store = MovementStore(r)
    ct = CareTeamStore(r)
    ct.add_stay("P1", "ONCO", start=T0, stay_id="manual1")
    for m in (Movement("1", "PAS", "A01", "P1", "V1", "CARDIO", T0),
              Movement("2", "PAS", "A02", "P1", "V1", "PNEUMO", T0 + 10),
              Movement("3", "PAS", "A01", "P2", "V2", "URG", T0 + 20),
              Movement("4", "PAS", "A03", "P2", "V2", None, T0 + 30),
              Movement("5", "PAS", "A01", "P3", "V3", "URG", T0 + 20),
              Movement("6", "PAS", "A40", "P4", None, None, T0 + 40, prior_patient="P3")):
        store.apply(m)
    snapshot = {p: (r.hgetall(store.keys.stays(p)), r.hgetall(store.keys.visits(p))) for p in ("P1", "P2", "P3", "P4")}
    assert store.replay(dry_run=True)["changed"] == []
    # Lose the state (e.g. a restore of an old dump), keep the journal: replay rebuilds it.
    for p in ("P1", "P2", "P3", "P4"):
        r.delete(store.keys.visits(p))
    r.hdel(store.keys.stays("P1"), "V1.2")
    r.hset(store.keys.stays("P2"), "V2.1", b'{"unit":"URG","start":0,"end":null}')
    result = store.replay()
    assert set(result["changed"]) == {"P1", "P2", "P4"}
    after = {p: (r.hgetall(store.keys.stays(p)), r.hgetall(store.keys.visits(p))) for p in ("P1", "P2", "P3", "P4")}
    assert after == snapshot
    assert b"manual1" in r.hgetall(store.keys.stays("P1"))
    assert r.smembers("dpiguard:ct:unit-patients:URG") == {b"P2", b"P4"}


def test_concurrent_movements_for_one_patient_are_serialised(r, redis_url):
    """Two writers racing on the same patient: WATCH retries, never a lost or mixed update."""
    store = MovementStore(r)
    store.apply(Movement("0", "PAS", "A01", "P1", "V1", "U0", T0))
    errors = []

    def worker(offset):
        client = redisconn.from_url(redis_url)
        s = MovementStore(client)
        for i in range(15):
            try:
                s.apply(Movement(f"w{offset}-{i}", "PAS", "A02", "P1", "V1", f"U{offset}{i}", T0 + 1 + i))
            except Exception as exc:  # AE (out of order) is allowed, anything else is not
                if getattr(exc, "ack", None) != "AE":
                    errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    visits = store.visits("P1")["visits"]["V1"]
    all_stays = CareTeamStore(r).patient_stays("P1")
    # Two transfers may have the same time (both workers count from T0): order by segment number.
    by_segment = sorted((s for s in all_stays if s["id"] in visits["segments"]), key=lambda s: int(s["id"].split(".")[1]))
    assert [s["id"] for s in by_segment] == visits["segments"]
    assert [s["start"] for s in by_segment] == sorted(s["start"] for s in by_segment)
    assert sum(1 for s in all_stays if s["end"] is None) == 1  # exactly one current unit
    # The journal holds every applied movement once (a movement two writers both finished is
    # written twice with one id and read once).
    assert len(visits["segments"]) == len(list(store.journal()))
    assert r.llen(store.keys.adt_outbox("P1")) == 0


def test_a_movement_interrupted_after_its_transaction_is_finished_by_the_next_one(r):
    """The process dies right after a movement's transaction (stays written, nothing else yet): the
    next message of that patient first finishes it, in order (index, journal, bus); replay too."""
    class Crashing(MovementStore):
        def finish_pending(self, patient):  # the process "dies" before finishing anything
            return 0

    Crashing(r).apply(Movement("1", "PAS", "A01", "P1", "V1", "CARDIO", T0))
    Crashing(r).apply(Movement("2", "PAS", "A02", "P1", "V1", "PNEUMO", T0 + 10))
    store = MovementStore(r)
    assert stays(r, "P1") == [("CARDIO", T0, T0 + 10), ("PNEUMO", T0 + 10, None)]  # in force already
    assert r.xlen(store.keys.journal) == 0 and r.llen(store.keys.adt_outbox("P1")) == 2
    assert r.sismember(store.keys.unit_patients("PNEUMO"), "P1")  # index written before the stays
    # A40 merging P1 into P2, interrupted between the surviving patient's side and the merged one's:
    Crashing(r).apply(Movement("3", "PAS", "A01", "P2", "V2", "URG", T0 + 20))
    Crashing(r).apply(Movement("4", "PAS", "A40", "P2", None, None, T0 + 30, prior_patient="P1"))
    assert {s[0] for s in stays(r, "P2")} == {"CARDIO", "PNEUMO", "URG"}
    assert stays(r, "P1") != []  # the merged side is not done yet: both ids hold the stays for now
    # The duplicate of the A40 (the sender did not get its ACK) finishes everything, in order:
    result = store.apply(Movement("4", "PAS", "A40", "P2", None, None, T0 + 30, prior_patient="P1"))
    assert result.duplicate
    assert stays(r, "P1") == [] and store.visits("P1")["visits"] == {}
    assert [mv.control_id for _, mv in store.journal()] == ["1", "2", "3", "4"]
    assert r.smembers(store.keys.unit_patients("CARDIO")) == {b"P2"}
    assert r.llen(store.keys.adt_outbox("P1")) == 0 and r.llen(store.keys.adt_outbox("P2")) == 0
    assert store.replay(dry_run=True)["changed"] == []


def test_replay_finishes_interrupted_movements_before_rebuilding(r):
    class Crashing(MovementStore):
        def finish_pending(self, patient):
            return 0

    Crashing(r).apply(Movement("1", "PAS", "A01", "P1", "V1", "CARDIO", T0))
    store = MovementStore(r)
    result = store.replay()
    assert result["entries"] == 1 and result["changed"] == []  # journaled first, so nothing is undone
    assert stays(r, "P1") == [("CARDIO", T0, None)]


def test_a_connection_sending_only_whitespace_is_closed_after_the_read_timeout(feed):
    """read_timeout (1 s here) runs from connect for the first frame: neither trickled whitespace nor
    silence keeps a connection open (it used to start only at the first 0x0B, so forever)."""
    with socket.create_connection(("127.0.0.1", feed.port), timeout=10) as sock:
        started = time.monotonic()
        closed = False
        while time.monotonic() - started < 6:
            try:
                sock.sendall(b" \r\n")
            except OSError:
                closed = True
                break
            sock.settimeout(0.3)
            try:
                if sock.recv(10) == b"":
                    closed = True
                    break
            except TimeoutError:
                pass
        assert closed and time.monotonic() - started < 4
    with socket.create_connection(("127.0.0.1", feed.port), timeout=10) as sock:  # connect, send nothing
        started = time.monotonic()
        assert sock.recv(10) == b"" and time.monotonic() - started < 4
    # A persistent connection may stay silent between two frames.
    with socket.create_connection(("127.0.0.1", feed.port), timeout=10) as sock:
        assert msa(send_on(sock, adt("A01", patient="P0077", at=T0)))[1] == "AA"
        time.sleep(1.5)
        assert msa(send_on(sock, adt("A03", patient="P0077", at=T0 + 5)))[1] == "AA"
