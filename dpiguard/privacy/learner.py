"""Learning patient demographics from what passes through, off the request path.

The ADT listener hands each applied HL7 message (:meth:`Learner.note_hl7`) and the FHIR answer check
each parsed answer (:meth:`Learner.note_fhir`) to this learner: an O(1) append to a bounded in-process
queue, no parsing, no I/O. A worker thread parses, hashes (:mod:`dpiguard.privacy.pseudonyms`) and
writes in batches (:class:`~dpiguard.privacy.store.PrivacyStore`). The clear text lives only in that
queue, a few hundred milliseconds. A full queue drops the oldest notes (counted in ``dropped``): the
next message or answer about the patient brings them back; nothing is ever refused because of it.
"""

from __future__ import annotations

import logging
import threading
from collections import deque

import orjson
import redis

from dpiguard.ids import ID_RE
from dpiguard.privacy.pseudonyms import Hasher
from dpiguard.privacy.sources import fhir_patients, from_fhir_patient, from_hl7
from dpiguard.privacy.store import PrivacyStore

log = logging.getLogger("dpiguard.privacy")
BATCH_SECONDS = 0.5


class Learner:
    def __init__(self, store: PrivacyStore, hasher: Hasher, max_queue: int = 20_000):
        self.store = store
        self.hasher = hasher
        self._queue: deque = deque(maxlen=max_queue)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._recent: dict[int, None] = {}  # answers already learnt (the same bytes come back on every read)
        self.learnt = 0
        self.skipped = 0
        self.dropped = 0
        self.errors = 0

    # -- producers (request path / ADT listener): no I/O ---------------------------------------------
    def note_hl7(self, text: str, patient: str | None = None) -> None:
        self._put(("hl7", text, patient))

    def note_fhir(self, body: bytes | dict) -> None:
        """A FHIR answer (raw bytes, parsed again in the worker; or a dict nobody changes any more)."""
        self._put(("fhir", body, None))

    def _put(self, item) -> None:
        if len(self._queue) == self._queue.maxlen:
            self.dropped += 1
        self._queue.append(item)

    # -- worker ------------------------------------------------------------------------------------
    def start(self) -> "Learner":
        self._thread = threading.Thread(target=self._run, name="privacy-learner", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
        try:
            self.process()  # what is left
        except Exception as exc:  # noqa: BLE001
            log.warning("dpiguard privacy: demographics not stored at shutdown: %s", exc)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(BATCH_SECONDS)
            self._wake.clear()
            try:
                self.process()
            except redis.RedisError as exc:
                log.warning("dpiguard privacy: demographics not stored (Redis: %s); retrying", exc)
                self._stop.wait(1.0)
            except Exception:  # noqa: BLE001 - the learner must survive anything
                log.exception("dpiguard privacy: learner error")

    def process(self, limit: int = 2000) -> int:
        items = []
        while self._queue and len(items) < limit:
            items.append(self._queue.popleft())
        if not items:
            return 0
        hashed = []
        digests: list[int] = []
        for kind, payload, patient in items:
            try:
                if kind == "hl7":
                    pid, d = from_hl7(payload)
                    patient = patient or pid
                    if patient and ID_RE.fullmatch(patient) and not d.empty():
                        hashed.append((patient, self.hasher.pseudonyms(d)))
                else:
                    if isinstance(payload, (bytes, bytearray)):
                        digest = hash(bytes(payload))
                        if digest in self._recent:
                            self.skipped += 1
                            continue
                        digests.append(digest)
                        payload = orjson.loads(payload)
                    for pid, resource in fhir_patients(payload):
                        d = from_fhir_patient(resource)
                        if ID_RE.fullmatch(pid) and not d.empty():
                            hashed.append((pid, self.hasher.pseudonyms(d)))
            except Exception:  # noqa: BLE001 - one odd message never stops the others
                self.errors += 1
        try:
            self.store.learn_patients(hashed)
        except Exception:
            # Put the hashes' sources back in front so a Redis outage loses nothing that was noted.
            self._queue.extendleft(reversed(items))
            raise
        if len(self._recent) > 50_000:
            self._recent.clear()
        self._recent.update(dict.fromkeys(digests))
        self.learnt += len(hashed)
        return len(hashed)
