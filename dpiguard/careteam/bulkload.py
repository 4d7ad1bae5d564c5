"""Bulk loading of care-team data: the writes of :class:`~dpiguard.careteam.CareTeamStore`, batched.

Loading a hospital (a million stays, memberships and assignments) one write at a time costs several
round trips per row. :class:`CareTeamBulkLoader` writes the same keys with the same values, validated
by the same checks, but a batch of rows per round trip:

- every row is validated like the one-by-one method would (``ValueError`` naming the row); a bad row
  stops the load before its batch is written (earlier batches stay written, as if the one-by-one
  methods had been called for them);
- each batch is written in the store's safe order (:func:`dpiguard.storage.batch.run_stages`):
  index entries first (``unit-members``, ``user-assign``, ``unit-patients``), then the authoritative
  keys, then the index entries a replaced stay no longer needs are removed and re-checked against the
  stays as they are then (exactly like :meth:`CareTeamStore.add_stay`), so an index may keep a stale
  entry but never misses a live one; on a standalone server or Sentinel the writes of a batch are one
  MULTI/EXEC, on a Redis Cluster one pipeline per stage (every topology is supported);
- after each written batch the loader publishes ``all`` on the invalidation bus (the bulk-import
  event of docs/architecture.md): every instance drops its cached decisions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence, TypeVar

import orjson
import redis

from dpiguard.careteam.store import CareTeamStore
from dpiguard.ids import check_id, check_unit
from dpiguard.storage.batch import run_stages
from dpiguard.storage.bus import format_event
from dpiguard.storage.clients import as_text
from dpiguard.times import check_epoch, check_window, fmt_epoch

T = TypeVar("T")


@dataclass(frozen=True)
class MembershipRow:
    login: str
    unit: str
    start: float | None = None
    end: float | None = None


@dataclass(frozen=True)
class StayRow:
    patient: str
    unit: str
    start: float
    end: float | None
    stay_id: str


@dataclass(frozen=True)
class AssignmentRow:
    login: str
    patient: str
    kind: str = "assigned"
    start: float | None = None
    end: float | None = None


def _batches(rows: Iterable[T], size: int) -> Iterator[list[T]]:
    batch: list[T] = []
    for row in rows:
        batch.append(row)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


class CareTeamBulkLoader:
    """Batched writes with the semantics of the store's one-by-one writes (see the module docstring)."""

    def __init__(self, store: CareTeamStore, batch_size: int = 2000, max_retries: int = 10):
        # max_retries: kept for callers; writes no longer use WATCH, so nothing is retried
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        self.store = store
        self.redis: redis.Redis = store.redis
        self.batch_size = batch_size
        self.max_retries = max_retries

    # ----------------------------------------------------------------- memberships

    def add_unit_members(self, rows: Iterable[MembershipRow], first_index: int = 0) -> int:
        """Like :meth:`CareTeamStore.add_unit_member` for each row; returns the number of rows."""
        count = 0
        for batch in _batches(rows, self.batch_size):
            checked = []
            for i, row in enumerate(batch, count + first_index):
                try:
                    login, unit = check_id(row.login, "login"), check_unit(row.unit)
                    start = check_epoch(row.start, "start", optional=True)
                    end = check_epoch(row.end, "end", optional=True)
                    check_window(start, end)
                except ValueError as exc:
                    raise ValueError(f"membership row {i}: {exc}") from None
                checked.append((login, unit, f"{fmt_epoch(start)}|{fmt_epoch(end)}"))
            keys = self.store.keys
            run_stages(self.redis, [
                lambda pipe: [pipe.sadd(keys.unit_members(unit), login) for login, unit, _ in checked],
                lambda pipe: [pipe.hset(keys.user_units(login), unit, value) for login, unit, value in checked],
            ])
            self._publish_all()
            count += len(batch)
        return count

    # ----------------------------------------------------------------- assignments

    def assign_many(self, rows: Iterable[AssignmentRow], first_index: int = 0) -> int:
        """Like :meth:`CareTeamStore.assign` for each row; returns the number of rows."""
        count = 0
        for batch in _batches(rows, self.batch_size):
            checked = []
            for i, row in enumerate(batch, count + first_index):
                try:
                    login, patient = check_id(row.login, "login"), check_id(row.patient, "patient")
                    kind = check_id(row.kind, "assignment kind")
                    start = check_epoch(row.start, "start", optional=True)
                    end = check_epoch(row.end, "end", optional=True)
                    check_window(start, end)
                except ValueError as exc:
                    raise ValueError(f"assignment row {i}: {exc}") from None
                checked.append((login, patient, orjson.dumps({"kind": kind, "start": start, "end": end})))
            keys = self.store.keys
            run_stages(self.redis, [
                lambda pipe: [pipe.sadd(keys.user_assignments(login), patient) for login, patient, _ in checked],
                lambda pipe: [pipe.hset(keys.assignments(patient), login, value) for login, patient, value in checked],
            ])
            self._publish_all()
            count += len(batch)
        return count

    # ----------------------------------------------------------------- stays

    def add_stays(self, rows: Iterable[StayRow], first_index: int = 0) -> int:
        """Like :meth:`CareTeamStore.add_stay` (with an explicit stay id) for each row."""
        count = 0
        for batch in _batches(rows, self.batch_size):
            checked = []
            for i, row in enumerate(batch, count + first_index):
                try:
                    patient, unit = check_id(row.patient, "patient"), check_unit(row.unit)
                    start = check_epoch(row.start, "start", optional=False)
                    end = check_epoch(row.end, "end", optional=True)
                    check_window(start, end)
                    stay_id = check_id(row.stay_id, "stay id")
                except ValueError as exc:
                    raise ValueError(f"stay row {i}: {exc}") from None
                checked.append((patient, unit, stay_id, orjson.dumps({"unit": unit, "start": start, "end": end})))
            self._write_stays(checked)
            self._publish_all()
            count += len(batch)
        return count

    def _write_stays(self, checked: Sequence[tuple[str, str, str, bytes]]) -> None:
        keys = self.store.keys
        patients = sorted({patient for patient, *_ in checked})
        reader = self.redis.pipeline(transaction=False)
        for patient in patients:
            reader.hgetall(keys.stays(patient))
        current = dict(zip(patients, reader.execute()))
        release: list[tuple[str, str]] = []  # (patient, unit) index entries a replaced stay may free
        for patient, unit, stay_id, value in checked:
            # Later rows of the same batch see this one, as sequential add_stay calls would.
            old_unit = self.store.unit_to_release(current[patient], stay_id, keep_unit=unit)
            if old_unit is not None:
                release.append((patient, old_unit))
            stays = {as_text(k): v for k, v in current[patient].items()}
            stays[stay_id] = value
            current[patient] = stays
        run_stages(self.redis, [
            lambda pipe: [pipe.sadd(keys.unit_patients(unit), patient) for patient, unit, _, _ in checked],
            lambda pipe: [pipe.hset(keys.stays(patient), stay_id, value) for patient, _, stay_id, value in checked],
        ])
        for patient in sorted({p for p, _ in release}):
            self.store.release_units(patient, sorted({u for p, u in release if p == patient}))

    # ----------------------------------------------------------------- bus

    def _publish_all(self) -> None:
        self.redis.publish(self.store.channel, format_event("all", ""))
