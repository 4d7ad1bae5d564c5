"""The privacy monitor: reads the access records dpiguard wrote and raises privacy alerts, off the request path.

Source: audit chains, i.e. a folder of chains (``audit.path`` of a proxy host, or the central store of
``dpiguard audit collect``). The files are the source of truth and are never trimmed by anyone but
``dpiguard audit prune``, so a monitor that was stopped for a day resumes where it stopped and misses
nothing. It reads each chain from its position, in batches, in file order.

Position and state, all in Redis and all idempotent, so that a restart (or a crash anywhere) replays a
few records without ever alerting twice, and several monitors may run at once (one per proxy host on
its own chains, or a standby on the same chains):

- ``P:pv:pos`` chain → seq of the last record fully processed: written only once every effect of the
  batch is in Redis and its alerts are durable in the monitor's own chain;
- alerts: id derived from detector + user + subject + period, created with ``HSETNX``
  (:mod:`dpiguard.privacy.alerts`);
- deferred candidates (``P:pv:pending``, score = when the care-event window ends): ``ZADD`` of a
  deterministic member; evaluated once the monitor's clock (the *watermark*) passes it;
- what baselines need per day: sets (``SADD``: a replayed record adds nothing), closed once the day is
  over; writes seen per patient (``ZADD GT``).

The watermark: per chain, the time of the last access record read, or "now" (the wall clock) when the
chain has nothing more (a proxy idle or stopped); the monitor's clock is the minimum over chains. So a
one-shot run (``until_idle``) evaluates only the candidates whose window is really over; the others wait
in Redis for the next run.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Callable
from zoneinfo import ZoneInfo

import orjson
import redis

from dpiguard.audit.chain import list_chains, list_segments
from dpiguard.careteam.membership import parse_assignment, parse_stay
from dpiguard.privacy.alerts import Alert, AlertQueue, alert_id
from dpiguard.privacy.detectors import DAY, Access, Candidate, Facts, care_event, evaluate
from dpiguard.privacy.store import PrivacyStore, Profile, parse_patient
from dpiguard.storage.clients import as_text
from dpiguard.storage.keys import Keys
from dpiguard.times import parse_iso_ms

log = logging.getLogger("dpiguard.privacy")
ORDERS_TTL = 14 * 86400
CACHE_SECONDS = 60.0  # patient profiles and stays read for the immediate detectors
DAY_MARGIN = 2 * 3600  # a day is closed this long after its end (late records of other chains)


# -- reading chains ---------------------------------------------------------------------------------

class ChainReader:
    """Complete lines of one chain after a seq, in order, remembering where it stopped."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.name = folder.name
        self._hint: tuple[Path, int, int] | None = None  # (segment, offset after line, seq of that line)

    def read(self, after: int, limit: int) -> list[tuple[int, dict]]:
        segments = list_segments(self.folder)
        if not segments:
            return []
        start = [s for s in segments if s[0] <= after + 1] or segments[:1]
        begin = segments.index(start[-1])
        out: list[tuple[int, dict]] = []
        for _, path in segments[begin:]:
            offset = 0
            if self._hint and self._hint[0] == path and self._hint[2] <= after:
                offset = self._hint[1]
            with open(path, "rb") as fh:
                fh.seek(offset)
                for raw in fh:
                    if not raw.endswith(b"\n"):
                        return out  # being written
                    offset += len(raw)
                    if not raw.startswith(b'{"seq":'):
                        continue
                    seq = int(raw[7:raw.index(b",", 7)])
                    if seq <= after:
                        continue
                    try:
                        record = orjson.loads(raw)
                    except orjson.JSONDecodeError:
                        continue
                    self._hint = (path, offset, seq)
                    out.append((seq, record))
                    if len(out) >= limit:
                        return out
        return out


ACCESS_EVENTS = ("access", "fhir_response")
_MINUTES: dict[str, float] = {}


def record_time(text) -> float | None:
    """Epoch of an ``iso_ms`` time (``2026-11-20T14:30:05.123Z``), fast: the minute is parsed once."""
    if not isinstance(text, str) or len(text) < 20:
        return parse_iso_ms(text) if text else None
    base = _MINUTES.get(text[:16])
    if base is None:
        base = parse_iso_ms(text[:16] + ":00.000Z")
        if base is None:
            return None
        if len(_MINUTES) > 100_000:
            _MINUTES.clear()
        _MINUTES[text[:16]] = base
    try:
        return base + float(text[17:-1])
    except ValueError:
        return parse_iso_ms(text)


def accesses_of(record: dict, seq: int) -> list[Access]:
    """The allowed accesses to patient data in one record (request decisions and FHIR answers)."""
    event = record.get("event")
    if event not in ACCESS_EVENTS or record.get("outcome") != "allow" or not record.get("user"):
        return []
    patients: set[str] = set()
    if isinstance(record.get("patient"), str):
        patients.update(p for p in record["patient"].split(",") if p)
    if isinstance(record.get("patients"), list):
        patients.update(p for p in record["patients"] if isinstance(p, str))
    if not patients:
        return []
    t = record_time(record.get("time"))
    if t is None:
        return []
    write = record.get("action") == "write"
    roles = tuple(record.get("roles") or ())
    units = tuple(record.get("units") or ())
    return [Access(record["user"], roles, units, p, t, record.get("category"), write, record.get("care_team"),
                   bool(record.get("break_glass")), record.get("request_id"), record.get("instance"), seq)
            for p in sorted(patients)]


# -- the monitor ------------------------------------------------------------------------------------

@dataclass
class Stats:
    records: int = 0
    accesses: int = 0
    alerts: int = 0
    duplicates: int = 0
    pending: int = 0
    days_closed: int = 0


class PrivacyMonitor:
    """``policies``: a callable returning the policy set in service (hot reload); ``audit``: the
    monitor's own AuditLog (alert records); ``on_alert``: called with each new alert (metrics)."""

    def __init__(self, client: redis.Redis, source: Path, audit, policies: Callable[[], Any], *,
                 prefix: str = "dpiguard", alert_retention_days: float = 400, batch: int = 2000,
                 on_alert: Callable[[Alert], None] | None = None, exclude: tuple[str, ...] = ()):
        self.r = client
        self.source = Path(source)
        self.audit = audit
        self.policies = policies
        self.keys = Keys(prefix)
        self.store = PrivacyStore(client, prefix)
        self.queue = AlertQueue(client, prefix, alert_retention_days)
        self.batch = batch
        self.on_alert = on_alert
        self.exclude = set(exclude)
        self.readers: dict[str, ChainReader] = {}
        self.stats = Stats()
        self._staff_cache: dict[str, tuple[Profile, float]] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.last_error: str | None = None
        self.watermark = 0.0
        self._max_time = 0.0
        self._deferred_recently: set[tuple] = set()
        self._patient_cache: dict[str, tuple] = {}
        self._pair_cache: dict[tuple[str, str], tuple] = {}

    # -- lifecycle ---------------------------------------------------------------------------------
    def start(self, interval: float = 1.0) -> "PrivacyMonitor":
        self._thread = threading.Thread(target=self.run, kwargs={"interval": interval}, name="privacy-monitor",
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None

    def run(self, interval: float = 1.0, until_idle: bool = False) -> Stats:
        """Follow the chains until stopped (or, ``until_idle``, until everything is read and evaluated)."""
        recovered = False
        while not self._stop.is_set():
            try:
                if not recovered:
                    self.recover()
                    recovered = True
                n = self.step(until_idle=until_idle)
                self.last_error = None
            except redis.RedisError as exc:
                self.last_error = f"Redis: {exc}"
                log.warning("dpiguard privacy: monitor paused (%s); it resumes where it stopped", exc)
                self._stop.wait(interval)
                continue
            except Exception as exc:  # noqa: BLE001 - keep going; the position did not move
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.exception("dpiguard privacy: monitor error; batch will be retried")
                self._stop.wait(interval)
                continue
            if n == 0:
                if until_idle:
                    return self.stats
                self._stop.wait(interval)
        return self.stats

    def recover(self) -> int:
        """Record alerts a monitor created but could not record (killed in between)."""
        n = 0
        for alert in self.queue.unrecorded(older_than=60.0):
            self.audit.write(alert.record())
            self.queue.recorded(alert.id)
            n += 1
        return n

    # -- one step ----------------------------------------------------------------------------------
    def positions(self) -> dict[str, int]:
        return {as_text(k): int(v) for k, v in self.r.hgetall(self.keys.pv_positions).items()}

    def step(self, until_idle: bool = False, now: float | None = None) -> int:
        """Read one batch of every chain, process it, evaluate what is due. Returns records read."""
        policies = self.policies()
        rules = policies.privacy
        positions = self.positions()
        batch: list[tuple[str, int, dict]] = []
        marks: list[float] = []
        wall = time.time() if now is None else now
        last_time = 0.0
        for chain in list_chains(self.source):
            if chain.name in self.exclude:
                continue
            reader = self.readers.setdefault(chain.name, ChainReader(chain))
            rows = reader.read(positions.get(chain.name, 0), self.batch)
            for seq, rec in rows:
                batch.append((chain.name, seq, rec))
            # the clock follows the accesses (a checkpoint or an admin record says nothing about them)
            times = [record_time(r.get("time")) or 0.0 for _, r in rows if r.get("event") in ACCESS_EVENTS]
            if times:
                last_time = max(last_time, max(times))
                self._max_time = max(self._max_time, last_time)
            if len(rows) >= self.batch:
                marks.append(max(times) if times else 0.0)
        accesses: list[Access] = []
        for _, seq, rec in batch:
            accesses.extend(accesses_of(rec, seq))
        self.stats.records += len(batch)
        self.stats.accesses += len(accesses)
        if accesses:
            self._process(accesses, rules)
        if marks:
            self.watermark = max(self.watermark, min(marks))
        elif until_idle and batch:  # one-shot run: the records read so far, then (caught up) "now"
            self.watermark = max(self.watermark, last_time)
        else:
            self.watermark = max(self.watermark, wall)
        due = self._evaluate_due(rules)
        closed = self._close_days(rules)
        if batch:  # every effect of the batch is in Redis and its alerts are durable: move on
            new_pos: dict[str, int] = {}
            for chain, seq, _ in batch:
                new_pos[chain] = max(seq, new_pos.get(chain, 0))
            self.r.hset(self.keys.pv_positions, mapping=new_pos)
        return len(batch) + due + closed

    # -- a batch of accesses -------------------------------------------------------------------------
    def _process(self, accesses: list[Access], rules) -> None:
        care_hours = rules.general["care_event_hours"]
        tz = ZoneInfo(rules.timezone)
        users = sorted({a.user for a in accesses})
        staff = self._staff(users)
        patients = sorted({a.patient for a in accesses})
        pairs = sorted({(a.user, a.patient) for a in accesses})
        pat, stays, assignment = self._patients(patients, pairs)
        tokens = {t for a in accesses for t in (staff[a.user].pseudonyms.family & pat[a.patient].pseudonyms.family)}
        counts, known = self.store.name_counts(tokens) if tokens else ({}, 0)
        staff_patients = {login for p in patients for login in pat[p].links}
        staff_units = self._units(staff_patients) if staff_patients else {}
        candidates: list[Candidate] = []
        day_patients: dict[tuple[str, str], set[str]] = {}
        day_hours: dict[tuple[str, str], set[str]] = {}
        day_users: dict[str, dict[str, str]] = {}
        orders: dict[str, dict[str, float]] = {}
        hours: dict[int, tuple[str, str]] = {}
        for a in accesses:
            p = pat[a.patient]
            shared = frozenset(u for login in p.links if login != a.user
                               for u in staff_units.get(login, ())) & frozenset(a.units)
            facts = Facts(staff[a.user], p, counts, known, stays[a.patient], assignment[(a.user, a.patient)], shared)
            candidates.extend(evaluate(a, facts, rules, care_hours))
            hour_key = int(a.t // 900)  # time zone offsets are multiples of 15 minutes
            local = hours.get(hour_key)
            if local is None:
                dt = datetime.fromtimestamp(hour_key * 900, tz)
                local = hours[hour_key] = (dt.strftime("%Y-%m-%d"), f"{dt.hour:02d}")
            day, hour = local
            day_patients.setdefault((a.user, day), set()).add(a.patient)
            day_hours.setdefault((a.user, day), set()).add(f"{hour}:{a.patient}")
            day_users.setdefault(day, {})[a.user] = a.roles[0] if a.roles else "-"
            if a.write:
                o = orders.setdefault(a.patient, {})
                for who in [f"u:{a.user}"] + [f"unit:{u}" for u in write_units(a)]:
                    o[who] = max(a.t, o.get(who, 0.0))
        pipe = self.r.pipeline(transaction=False)
        for (user, day), ps in day_patients.items():
            pipe.sadd(self.keys.pv_day_patients(user, day), *ps)
            pipe.expire(self.keys.pv_day_patients(user, day), 4 * 86400)
        for (user, day), hs in day_hours.items():
            pipe.sadd(self.keys.pv_day_hours(user, day), *hs)
            pipe.expire(self.keys.pv_day_hours(user, day), 4 * 86400)
        if day_users:
            pipe.sadd(self.keys.pv_days, *day_users)
        for day, us in day_users.items():
            pipe.hset(self.keys.pv_day_users(day), mapping=us)
            pipe.expire(self.keys.pv_day_users(day), 40 * 86400)
        for patient, o in orders.items():
            pipe.zadd(self.keys.pv_orders(patient), o, gt=True)
            pipe.expire(self.keys.pv_orders(patient), ORDERS_TTL)
        # one check per detector, user, subject and day: the first access of the day stands for the others
        deferred, seen = [], set()
        for c in candidates:
            if c.deferred:
                mark = (c.detector, c.access.user, c.key, int(c.access.t // DAY))
                if mark not in seen and mark not in self._deferred_recently:
                    seen.add(mark)
                    deferred.append(c)
        if len(self._deferred_recently) > 500_000:
            self._deferred_recently.clear()
        self._deferred_recently.update(seen)
        if deferred:
            pipe.zadd(self.keys.pv_pending, {_pending_member(c): c.due for c in deferred})
        pipe.execute()
        self.stats.pending += len(deferred)
        for c in candidates:
            if not c.deferred:
                self._raise(c, rules)

    def _patients(self, patients: list[str], pairs: list[tuple[str, str]]):
        """Profiles, stays and the users' assignments, read in one round trip and kept CACHE_SECONDS (the
        feeds change them rarely; the deferred checks always read them afresh)."""
        now = time.monotonic()
        cache, pair_cache = self._patient_cache, self._pair_cache
        if len(cache) > 200_000:
            cache.clear()
        if len(pair_cache) > 500_000:
            pair_cache.clear()
        missing = [p for p in patients if (hit := cache.get(p)) is None or hit[2] < now]
        missing_pairs = [x for x in pairs if (hit := pair_cache.get(x)) is None or hit[1] < now]
        if missing or missing_pairs:
            pipe = self.r.pipeline(transaction=False)
            for p in missing:
                pipe.hgetall(self.keys.pv_patient(p))
                pipe.get(self.keys.pv_vip(p))
                pipe.hgetall(self.keys.stays(p))
            for u, p in missing_pairs:
                pipe.hget(self.keys.assignments(p), u)
            res = pipe.execute()
            until = now + CACHE_SECONDS
            for i, p in enumerate(missing):
                cache[p] = (parse_patient(res[3 * i], res[3 * i + 1]), _stays(res[3 * i + 2]), until)
            base = 3 * len(missing)
            for i, pair in enumerate(missing_pairs):
                pair_cache[pair] = (_assignment(res[base + i], pair[0]), until)
        return ({p: cache[p][0] for p in patients}, {p: cache[p][1] for p in patients},
                {x: pair_cache[x][0] for x in pairs})

    def _staff(self, users: list[str]) -> dict[str, Profile]:
        now = time.monotonic()
        out, missing = {}, []
        for u in users:
            hit = self._staff_cache.get(u)
            if hit is not None and hit[1] > now:
                out[u] = hit[0]
            else:
                missing.append(u)
        if missing:
            for u, profile in self.store.staff_many(missing).items():
                out[u] = profile
                self._staff_cache[u] = (profile, now + 60)
            if len(self._staff_cache) > 50_000:
                self._staff_cache.clear()
        return out

    def _units(self, logins: set[str]) -> dict[str, set[str]]:
        ordered = sorted(logins)
        pipe = self.r.pipeline(transaction=False)
        for login in ordered:
            pipe.hkeys(self.keys.user_units(login))
        return {login: {as_text(u).upper() for u in units} for login, units in zip(ordered, pipe.execute())}

    # -- deferred candidates -----------------------------------------------------------------------
    def _evaluate_due(self, rules) -> int:
        care_hours = rules.general["care_event_hours"]
        done = 0
        while True:
            rows = self.r.zrangebyscore(self.keys.pv_pending, "-inf", self.watermark, start=0, num=2000)
            if not rows:
                return done
            cands = [_candidate(m) for m in rows]
            pipe = self.r.pipeline(transaction=False)
            whos = []
            for c in cands:
                who = [f"u:{c.access.user}"] + [f"unit:{u}" for u in c.access.units]
                whos.append(who)
                pipe.hgetall(self.keys.stays(c.access.patient))
                pipe.hget(self.keys.assignments(c.access.patient), c.access.user)
                pipe.zmscore(self.keys.pv_orders(c.access.patient), who)
            res = pipe.execute()
            for i, c in enumerate(cands):
                rule = rules.on(c.detector)
                if rule is None:
                    continue  # switched off since
                orders = {w: float(v) for w, v in zip(whos[i], res[3 * i + 2] or ()) if v is not None}
                explained = care_event(c, _stays(res[3 * i]), _assignment(res[3 * i + 1], c.access.user), orders,
                                       care_hours)
                if explained is None:
                    c.evidence["care_event"] = False
                    self._raise(c, rules)
            self.r.zrem(self.keys.pv_pending, *rows)
            done += len(rows)

    # -- days: volume and hours baselines ------------------------------------------------------------
    def _close_days(self, rules) -> int:
        tz = ZoneInfo(rules.timezone)
        days = sorted(as_text(d) for d in self.r.smembers(self.keys.pv_days))
        n = 0
        for day in days:
            end = datetime.strptime(day, "%Y-%m-%d").replace(tzinfo=tz) + timedelta(days=1)
            if end.timestamp() + DAY_MARGIN > self.watermark:
                continue
            self._close_day(day, end.timestamp(), rules)
            self.r.srem(self.keys.pv_days, day)
            n += 1
            self.stats.days_closed += 1
        return n

    def _close_day(self, day: str, end: float, rules) -> None:
        g = rules.general
        users = {as_text(k): as_text(v) for k, v in self.r.hgetall(self.keys.pv_day_users(day)).items()}
        order = sorted(users)
        pipe = self.r.pipeline(transaction=False)
        for u in order:
            pipe.scard(self.keys.pv_day_patients(u, day))
            pipe.smembers(self.keys.pv_day_hours(u, day))
            pipe.hgetall(self.keys.pv_history(u))
        res = pipe.execute()
        today: dict[str, tuple[int, dict[int, set[str]], dict[str, str]]] = {}
        for i, u in enumerate(order):
            per_hour: dict[int, set[str]] = {}
            for m in res[3 * i + 1]:
                h, _, p = as_text(m).partition(":")
                per_hour.setdefault(int(h), set()).add(p)
            history = {as_text(k): as_text(v) for k, v in res[3 * i + 2].items()}
            today[u] = (int(res[3 * i]), per_hour, history)
        # role statistics of the day, and the role baseline of the previous days
        roles = sorted(set(users.values()))
        role_today = {}
        for role in roles:
            counts = sorted(today[u][0] for u in order if users[u] == role)
            hours = [0] * 24
            for u in order:
                if users[u] == role:
                    for h, ps in today[u][1].items():
                        hours[h] += len(ps)
            role_today[role] = {"median": counts[len(counts) // 2] if counts else 0, "users": len(counts),
                                "hours": hours}
        pipe = self.r.pipeline(transaction=False)
        for role in roles:
            pipe.hgetall(self.keys.pv_role_history(role))
        role_hist = {role: {as_text(k): orjson.loads(v) for k, v in raw.items()}
                     for role, raw in zip(roles, pipe.execute())}
        first_day = (datetime.strptime(day, "%Y-%m-%d") - timedelta(days=g["history_days"])).strftime("%Y-%m-%d")
        baselines = {}
        for role in roles:
            past = [v for d, v in role_hist[role].items() if first_day <= d < day]
            if len(past) < 3:
                past = past + [role_today[role]]
            medians = sorted(v["median"] for v in past)
            hours = [sum(v["hours"][h] for v in past) for h in range(24)]
            total = sum(hours) or 1
            baselines[role] = (medians[len(medians) // 2] if medians else 0, [x / total for x in hours])
        vol, hrs = rules.on("volume"), rules.on("unusual_hours")
        for u in order:
            count, per_hour, history = today[u]
            role = users[u]
            past = {d: v for d, v in history.items() if first_day <= d < day}
            own_counts = sorted(int(v.split("|")[0]) for v in past.values())
            own_known = len(own_counts) >= g["min_history_days"]
            role_median, role_hours = baselines[role]
            # hours near the role's usual ones count as usual (a shift spills over the hour next to it)
            role_near = [max(role_hours[(h + d) % 24] for d in (-1, 0, 1)) for h in range(24)]
            if vol and own_known:
                own_median = own_counts[len(own_counts) // 2]
                if count >= vol.get("min_patients") and count > vol.get("role_factor") * max(1, role_median) and \
                        count > vol.get("own_factor") * max(1, own_median):
                    self._raise(Candidate("volume", _day_access(u, role, end), {
                        "patients": count, "day": day, "own": own_median,
                        "role": role_median}, key=day), rules, bucket_key=day)
            if hrs and own_known:
                days_with = [0] * 24  # days on which the user worked at this hour or within 2 hours of it
                for v in past.values():
                    mask = int(v.split("|")[1] or 0)
                    for h in range(24):
                        if any(mask >> ((h + d) % 24) & 1 for d in (-2, -1, 0, 1, 2)):
                            days_with[h] += 1
                unusual = [h for h in per_hour if days_with[h] / len(past) < hrs.get("own_share")
                           and role_near[h] < hrs.get("role_share")]
                patients = set().union(*(per_hour[h] for h in unusual)) if unusual else set()
                if len(patients) >= hrs.get("min_patients"):
                    self._raise(Candidate("unusual_hours", _day_access(u, role, end), {
                        "patients": len(patients), "day": day,
                        "hours": ", ".join(f"{h}h" for h in sorted(unusual))}, key=day), rules, bucket_key=day)
        pipe = self.r.pipeline(transaction=False)
        for u in order:
            count, per_hour, _ = today[u]
            mask = sum(1 << h for h in per_hour)
            pipe.hset(self.keys.pv_history(u), day, f"{count}|{mask}")
            pipe.expire(self.keys.pv_history(u), int((g["history_days"] + 7) * DAY))
            # one key per command: a Redis Cluster pipeline cannot delete keys of several slots at once
            pipe.delete(self.keys.pv_day_patients(u, day))
            pipe.delete(self.keys.pv_day_hours(u, day))
        for role in roles:
            pipe.hset(self.keys.pv_role_history(role), day, orjson.dumps(role_today[role]))
            pipe.expire(self.keys.pv_role_history(role), int((g["history_days"] + 7) * DAY))
        pipe.execute()

    # -- alerts ------------------------------------------------------------------------------------
    def _raise(self, c: Candidate, rules, bucket_key: str | None = None) -> None:
        a = c.access
        period = rules.general["realert_days"] * DAY
        bucket = 0 if bucket_key else int(a.t // period)
        aid = alert_id(c.detector, a.user, c.key or a.patient, bucket)
        access = {k: v for k, v in a.ref().items() if k not in ("user", "patient", "t")}
        access["explanation"] = c.evidence.get("explanation")
        alert = Alert(aid, c.detector, a.user, a.patient if a.patient != "-" else None, a.t, dict(c.evidence),
                      access if a.patient != "-" else {"roles": list(a.roles)})
        if not self.queue.create(alert):
            self.stats.duplicates += 1
            return
        try:
            self.audit.write(alert.record())
        except Exception:
            self.queue.forget(aid)  # raised again at the next try: the position did not move
            raise
        self.queue.recorded(aid)
        self.stats.alerts += 1
        if self.on_alert is not None:
            try:
                self.on_alert(alert)
            except Exception:  # noqa: BLE001 - metrics never stop the monitor
                log.exception("dpiguard privacy: alert hook failed")


def write_units(a: Access) -> tuple[str, ...]:
    """The units a write counts for as "something one of the user's units wrote": the unit whose stay or
    transversal rule allowed it (a nurse of CARDIO and PNEUMO writing in CARDIO's care of the patient
    did not write for PNEUMO), else all of the user's units (role only, assignment, emergency access)."""
    s = a.source or ""
    if s.startswith(("unit:", "transversal:")) and not a.break_glass:
        unit = s.split(" ", 1)[0].split(":", 1)[1]
        if unit:
            return (unit,)
    return a.units


def _day_access(user: str, role: str, end: float) -> Access:
    return Access(user, (role,), (), "-", end - 1, None, False, None, False, None, None, 0)


def _stays(raw) -> list[dict]:
    out = []
    for sid, value in (raw or {}).items():
        try:
            out.append(parse_stay(value, as_text(sid)))
        except ValueError:
            continue  # malformed stays are reported by the decisions; here they explain nothing
    return out


def _assignment(raw, login: str) -> dict | None:
    if raw is None:
        return None
    try:
        return parse_assignment(raw, login)
    except ValueError:
        return None


def _pending_member(c: Candidate) -> bytes:
    return orjson.dumps({"d": c.detector, "k": c.key, "w": c.deferred, "due": c.due, "e": c.evidence,
                         "a": c.access.ref()}, option=orjson.OPT_SORT_KEYS)


def _candidate(member) -> Candidate:
    d = orjson.loads(member)
    return Candidate(d["d"], Access.from_ref(d["a"]), d["e"], d["w"], d["due"], d["k"])
