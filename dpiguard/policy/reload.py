"""Hot reload of the policy files, without a gap and without ever running a broken policy.

A daemon thread of each proxy instance reads the four policy files every ``policies.reload_interval``
seconds (1 s by default; plain polling of contents, no inotify dependency) and compares a sha256 of
their bytes with the last state it looked at. When they changed:

1. the whole policy set is loaded and validated again (:meth:`PolicySet.load`, the same code as at
   start-up: every file of the folder, read once);
2. if that fails, the running policy stays in service untouched; the error is logged, written to the
   trace (``event: policy_reload, outcome: deny``) and shown in the health output (``policy_error``)
   until a later edit loads;
3. if it loads, it replaces the running set in **one attribute assignment** (``pipeline.policies``):
   a request, and the checks of its answer, are decided entirely with the old or entirely with the
   new set, never with a mix and never with none. The in-process decision caches are dropped, the trace gets
   ``event: policy_reload, outcome: allow`` with both versions, the version is written to Redis
   (``P:policy:version``, and ``P:policy:instances`` instance → version) and an ``all`` message is
   published on the invalidation bus.

Every instance watches its **own** policy folder (they must all receive the same files: deploy them
the same way everywhere). The ``all`` message only makes the other instances look at their files at
once instead of at their next tick, and drop their caches. The health output shows the local version
and the shared one, so an instance whose files differ (drift) is visible.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from pathlib import Path
from typing import Any, Callable

import redis

from dpiguard.audit.chain import AuditLog
from dpiguard.policy.files import read_regular_file
from dpiguard.policy.seal import SEAL_FILE
from dpiguard.policy.snapshot import PolicySet
from dpiguard.policy.table import VERSIONED_FILES
from dpiguard.storage.batch import run_stages
from dpiguard.storage.keys import Keys

log = logging.getLogger("dpiguard")


def files_fingerprint(directory: Path) -> str:
    """sha256 over the bytes of the policy files and their seal (a missing or unreadable file, or one
    that is not a regular file, counts as a state; nothing here can block: see read_regular_file)."""
    digest = hashlib.sha256()
    for name in sorted(VERSIONED_FILES + (SEAL_FILE,)):
        digest.update(name.encode() + b"\0")
        try:
            data = read_regular_file(Path(directory) / name)
        except OSError as exc:
            digest.update(b"\1" + type(exc).__name__.encode())
            continue
        digest.update(str(len(data)).encode() + b"\0" + data)
    return digest.hexdigest()


class PolicyReloader:
    """Watches a policy folder and swaps the policy set of ``target`` (anything with a ``policies``
    attribute, i.e. the Pipeline) when a valid edit appears. Thread-safe; see the module docstring.

    ``load``: reads and validates the folder into a new :class:`PolicySet` (raises on any mistake)."""

    def __init__(self, *, target: Any, directory: Path, interval: float, audit: AuditLog,
                 load: Callable[[], PolicySet], on_swap: Callable[[], Any] = lambda: None,
                 redis_client: redis.Redis | None = None, prefix: str = "dpiguard", instance_id: str = "",
                 publish: Callable[[str], Any] | None = None, loaded_fingerprint: str | None = None):
        if interval <= 0:
            raise ValueError("interval must be positive")
        self.target = target
        self.directory = Path(directory)
        self.interval = float(interval)
        self.audit = audit
        self.on_swap = on_swap
        self.redis = redis_client
        self.prefix = prefix
        self.keys = Keys(prefix)
        self.instance_id = instance_id
        self.publish = publish
        self.load = load
        self._lock = threading.Lock()  # one reload at a time
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        # The files as they were when the running policy was loaded (taken before loading, so an
        # edit made meanwhile is seen at the first tick).
        self._seen = loaded_fingerprint or files_fingerprint(self.directory)
        self.error: str | None = None
        self.error_since: float | None = None
        self.last_reload: float | None = None
        self.reloads = 0
        self.failures = 0

    # -- lifecycle ---------------------------------------------------------------------------------
    def start(self) -> PolicyReloader:
        self.announce()
        self._stopping.clear()
        self._thread = threading.Thread(target=self._run, name="dpiguard-policy-reload", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def poke(self) -> None:
        """Look at the files now (another instance announced a new policy)."""
        self._wake.set()

    def on_bus_event(self, kind: str, ident: str) -> None:
        if kind == "all":
            self.poke()

    def _run(self) -> None:
        while not self._stopping.is_set():
            self._wake.wait(self.interval)
            self._wake.clear()
            if self._stopping.is_set():
                break
            try:
                self.check()
            except Exception:  # noqa: BLE001 - the watcher must survive anything; the old policy stays
                log.exception("dpiguard: policy watcher error; the running policy is kept")

    # -- one check ---------------------------------------------------------------------------------
    def check(self) -> bool | None:
        """Reload if the files changed since last looked at. True: new policy in service; False: the
        edit is invalid (old policy kept); None: nothing to do."""
        with self._lock:
            fingerprint = files_fingerprint(self.directory)
            if fingerprint == self._seen:
                return None
            # Let an editor finish writing: the files must read the same twice, a moment apart.
            self._stopping.wait(min(0.2, self.interval / 2))
            if files_fingerprint(self.directory) != fingerprint:
                return None  # still being written; next tick
            self._seen = fingerprint
            old = self.target.policies
            try:
                new = self.load()
            except Exception as exc:  # PolicyError, or anything unexpected: keep the running policy
                self._refuse(old, exc)
                return False
            if files_fingerprint(self.directory) != fingerprint:
                # Written to while we read it: look again at the next tick (never apply a half edit).
                self._seen = ""
                return None
            if new.version == old.version:
                self._clear_error(old)  # an invalid edit was undone
                return None
            self.target.policies = new  # the swap: one attribute assignment
            self.error, self.error_since = None, None
            self.last_reload, self.reloads = time.time(), self.reloads + 1
        try:
            self.on_swap()
        except Exception:  # noqa: BLE001
            log.exception("dpiguard: dropping caches after a policy reload failed")
        log.warning("dpiguard: policy reloaded from %s: version %s -> %s", self.directory, old.version, new.version)
        self._audit({"event": "policy_reload", "outcome": "allow", "reason": "reloaded",
                     "old_version": old.version, "new_version": new.version, "policy_version": new.version})
        self.announce(changed=True)
        return True

    def _refuse(self, old: PolicySet, exc: Exception) -> None:
        message = str(exc) if str(exc) else type(exc).__name__
        self.failures += 1
        self.error, self.error_since = message[:1000], time.time()
        log.error("dpiguard: policy edit refused, version %s stays in service: %s", old.version, message)
        self._audit({"event": "policy_reload", "outcome": "deny", "reason": "policy_invalid",
                     "policy_version": old.version, "detail": message[:1000]})

    def _clear_error(self, current: PolicySet) -> None:
        if self.error is not None:
            log.warning("dpiguard: policy files are back to version %s", current.version)
            self._audit({"event": "policy_reload", "outcome": "allow", "reason": "unchanged",
                         "policy_version": current.version, "detail": "files are valid again"})
        self.error, self.error_since = None, None

    def _audit(self, record: dict) -> None:
        try:
            self.audit.write(record)
        except Exception as exc:  # noqa: BLE001 - the trace failing must not stop the watcher
            log.error("dpiguard: could not trace policy reload: %s", exc)

    # -- shared version ----------------------------------------------------------------------------
    def announce(self, changed: bool = False) -> None:
        """Write this instance's version to Redis; after a change, tell the other instances."""
        version = self.target.policies.version
        try:
            if self.redis is not None:
                run_stages(self.redis, [
                    lambda pipe: pipe.set(self.keys.policy_version, version),
                    lambda pipe: pipe.hset(self.keys.policy_instances, self.instance_id,
                                           f"{version}|{int(time.time())}"),
                ])
            if changed and self.publish is not None:
                self.publish("all")
        except Exception as exc:  # noqa: BLE001 - local swap is done; others still see their own files
            log.warning("dpiguard: could not publish policy version %s: %s", version, exc)

    def status(self) -> dict:
        """For the health output: local version, shared version, last error."""
        shared = None
        if self.redis is not None:
            try:
                raw = self.redis.get(self.keys.policy_version)
                shared = raw.decode() if isinstance(raw, bytes) else raw
            except redis.RedisError:
                shared = None
        local = self.target.policies.version
        return {
            "policy_version": local,
            "policy_shared_version": shared,
            "policy_in_sync": shared == local,
            "policy_error": self.error,
            "policy_error_since": self.error_since,
            "policy_last_reload": self.last_reload,
            "policy_reloads": self.reloads,
        }
