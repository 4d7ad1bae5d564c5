"""Bulk loading of care-team data: the writes of :class:`~dpiguard.careteam.CareTeamStore`, batched.

Loading a hospital (a million stays, memberships and assignments) one write at a time costs several
round trips per row. :class:`CareTeamBulkLoader` writes the same keys with the same values, validated
by the same checks, but a batch of rows per round trip:

- every row is validated like the one-by-one method would (``ValueError`` naming the row); a bad row
  stops the load before its batch is written (earlier batches stay written, as if the one-by-one
  methods had been called for them);
- each batch is one MULTI/EXEC transaction; stays are written under WATCH of the patients' stay keys,
  read in one pipelined round trip, so replacing a stay moves the patient between unit indexes exactly
  like :meth:`CareTeamStore.add_stay` (retried if another writer touched one of those patients);
- after each committed batch the loader publishes ``all`` on the invalidation bus (the bulk-import
  event of docs/architecture.md): every instance drops its cached decisions.

Transactions span many keys, so the loader needs a single Redis (or Valkey) server, not a Cluster.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence, TypeVar

import orjson
import redis

from dpiguard.careteam.store import CareTeamStore
from dpiguard.ids import check_id, check_unit
from dpiguard.storage.bus import format_event
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
            pipe = self.redis.pipeline(transaction=True)
            for login, unit, value in checked:
                pipe.hset(self.store.keys.user_units(login), unit, value)
                pipe.sadd(self.store.keys.unit_members(unit), login)
            pipe.execute()
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
            pipe = self.redis.pipeline(transaction=True)
            for login, patient, value in checked:
                pipe.hset(self.store.keys.assignments(patient), login, value)
                pipe.sadd(self.store.keys.user_assignments(login), patient)
            pipe.execute()
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
        keys = sorted({self.store.keys.stays(patient) for patient, *_ in checked})
        for _ in range(self.max_retries):
            with self.redis.pipeline(transaction=True) as pipe:
                try:
                    pipe.watch(*keys)
                    # Read every patient's current stays in one round trip, on another connection,
                    # after WATCH: a write by anyone else from now on makes EXEC fail.
                    reader = self.redis.pipeline(transaction=False)
                    for key in keys:
                        reader.hgetall(key)
                    current = dict(zip(keys, reader.execute()))
                    pipe.multi()
                    for patient, unit, stay_id, value in checked:
                        stays_key = self.store.keys.stays(patient)
                        stays = current[stays_key]
                        old_unit = self.store._unit_to_release(stays, stay_id, keep_unit=unit)
                        pipe.hset(stays_key, stay_id, value)
                        pipe.sadd(self.store.keys.unit_patients(unit), patient)
                        if old_unit is not None:
                            pipe.srem(self.store.keys.unit_patients(old_unit), patient)
                        # Later rows of the same batch see this one, as sequential add_stay calls would.
                        stays = dict(stays)
                        stays[stay_id.encode()] = value
                        stays.pop(stay_id, None)
                        current[stays_key] = stays
                    pipe.execute()
                    return
                except redis.WatchError:
                    continue
        raise RuntimeError(f"bulk stay load: batch kept conflicting with other writers ({self.max_retries} tries)")

    # ----------------------------------------------------------------- bus

    def _publish_all(self) -> None:
        self.redis.publish(self.store.channel, format_event("all", ""))
