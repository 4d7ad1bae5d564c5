"""Privacy alerts: identity (idempotent), the record in the audit chain, the review queue.

An alert's id is derived from its detector, user, subject (patient, or day for the baselines) and
period (``realert_days``): every monitor instance, and the same monitor replaying records after a
restart, computes the same id, and ``HSETNX`` lets only the first one create it. So an alert exists
once in the review queue whatever the number of monitors or restarts.

Review queue (for ``dpiguard privacy alerts`` and the DPO console): ``P:pv:queue`` sorted set (alert
id → access time) and ``P:pv:alert:{ID}`` hash: ``data`` (orjson alert), ``status`` (``new``,
``justified``, ``abusive``), ``comment``, ``reviewer``, ``reviewed`` (epoch), ``recorded`` (``1`` once
its ``privacy_alert`` record is durable in the audit chain). Kept ``alert_retention_days`` (config).

The console of the DPO uses :class:`AlertQueue` as is: :meth:`AlertQueue.list` (filters, newest first)
and :meth:`AlertQueue.mark` (status, comment, reviewer; writes the audit record itself when given a log).
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from typing import Any, Iterable

import orjson
import redis

from dpiguard.privacy.rules import LABELS, REVIEW_STATUSES, SEVERITY, STATUS_LABELS, why
from dpiguard.storage.clients import as_text
from dpiguard.storage.keys import Keys
from dpiguard.times import iso_ms

DAY = 86400


def alert_id(detector: str, user: str, key: str, bucket: int) -> str:
    return hashlib.sha256(f"{detector}|{user}|{key}|{bucket}".encode()).hexdigest()[:20]


@dataclass
class Alert:
    id: str
    detector: str
    user: str
    patient: str | None
    time: float  # of the access (or the end of the day for baselines)
    evidence: dict
    access: dict | None  # request_id, instance, seq, roles, units, category, explanation
    status: str = "new"
    comment: str | None = None
    reviewer: str | None = None
    reviewed: float | None = None

    @property
    def label(self) -> str:
        return LABELS[self.detector]

    @property
    def text(self) -> str:
        return why(self.detector, self.evidence)

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "detector": self.detector, "label": self.label, "severity": SEVERITY[self.detector],
                "user": self.user, "patient": self.patient, "time": iso_ms(self.time), "why": self.text,
                "evidence": self.evidence, "access": self.access, "status": self.status,
                "status_label": STATUS_LABELS.get(self.status, self.status), "comment": self.comment,
                "reviewer": self.reviewer, "reviewed": iso_ms(self.reviewed) if self.reviewed else None}

    def record(self) -> dict[str, Any]:
        """The ``privacy_alert`` record of the audit chain (docs/privacy.md): evidence, why, the access."""
        acc = self.access or {}
        return {"event": "privacy_alert", "outcome": "alert", "reason": self.detector, "alert_id": self.id,
                "severity": SEVERITY[self.detector], "user": self.user, "roles": acc.get("roles") or [],
                "units": acc.get("units") or [], "patient": self.patient, "category": acc.get("category"),
                "request_id": acc.get("request_id"), "access_time": iso_ms(self.time),
                "access_instance": acc.get("instance"), "access_seq": acc.get("seq"),
                "care_team": acc.get("source"), "break_glass": bool(acc.get("break_glass")) or None,
                "evidence": self.evidence, "detail": self.text}

    def stored(self) -> bytes:
        return orjson.dumps({"id": self.id, "detector": self.detector, "user": self.user, "patient": self.patient,
                             "time": self.time, "evidence": self.evidence, "access": self.access})

    @classmethod
    def load(cls, raw: dict) -> "Alert":
        def f(name: str):
            v = raw.get(name.encode()) if name.encode() in raw else raw.get(name)
            return as_text(v) if v is not None else None

        d = orjson.loads(raw.get(b"data") or raw.get("data"))
        reviewed = f("reviewed")
        return cls(d["id"], d["detector"], d["user"], d.get("patient"), float(d["time"]), d.get("evidence") or {},
                   d.get("access"), f("status") or "new", f("comment"), f("reviewer"),
                   float(reviewed) if reviewed else None)


class AlertQueue:
    def __init__(self, client: redis.Redis, prefix: str = "dpiguard", retention_days: float = 400):
        self.r = client
        self.keys = Keys(prefix)
        self.retention = int(retention_days * DAY)

    def create(self, alert: Alert) -> bool:
        """True if this alert is new (the caller then records it); False if it exists already."""
        key = self.keys.pv_alert(alert.id)
        if not self.r.hsetnx(key, "data", alert.stored()):
            return False
        pipe = self.r.pipeline(transaction=False)
        pipe.hset(key, mapping={"status": "new", "recorded": "0", "created": str(int(time.time()))})
        pipe.expire(key, self.retention)
        pipe.zadd(self.keys.pv_queue, {alert.id: alert.time})
        pipe.execute()
        return True

    def recorded(self, alert_id: str) -> None:
        self.r.hset(self.keys.pv_alert(alert_id), "recorded", "1")

    def forget(self, alert_id: str) -> None:
        """Undo :meth:`create` (its audit record could not be written: it will be raised again)."""
        pipe = self.r.pipeline(transaction=False)
        pipe.delete(self.keys.pv_alert(alert_id))
        pipe.zrem(self.keys.pv_queue, alert_id)
        pipe.execute()

    def unrecorded(self, limit: int = 500, older_than: float = 0.0) -> list[Alert]:
        """Alerts created more than ``older_than`` seconds ago whose audit record is not known durable (a
        monitor died in between; younger ones may be a running monitor's, about to record them)."""
        limit_time = time.time() - older_than
        ids = [as_text(i) for i in self.r.zrevrange(self.keys.pv_queue, 0, 5000)]
        out = []
        pipe = self.r.pipeline(transaction=False)
        for i in ids:
            pipe.hgetall(self.keys.pv_alert(i))
        for raw in pipe.execute():
            created = float(as_text(raw.get(b"created") or raw.get("created") or b"0")) if raw else 0.0
            if raw and as_text(raw.get(b"recorded") or raw.get("recorded")) == "0" and created <= limit_time:
                out.append(Alert.load(raw))
                if len(out) >= limit:
                    break
        return out

    def get(self, alert_id: str) -> Alert | None:
        raw = self.r.hgetall(self.keys.pv_alert(alert_id))
        return Alert.load(raw) if raw and (b"data" in raw or "data" in raw) else None

    def list(self, *, status: str | None = None, detector: str | None = None, user: str | None = None,
             since: float | None = None, until: float | None = None, limit: int = 200) -> list[Alert]:
        """Alerts, newest first, filtered (what the console's review page shows)."""
        self.prune()
        ids = [as_text(i) for i in self.r.zrevrangebyscore(self.keys.pv_queue, "+inf" if until is None else f"({until}",
                                                           "-inf" if since is None else since)]
        out: list[Alert] = []
        for start in range(0, len(ids), 500):
            chunk = ids[start:start + 500]
            pipe = self.r.pipeline(transaction=False)
            for i in chunk:
                pipe.hgetall(self.keys.pv_alert(i))
            for raw in pipe.execute():
                if not raw:
                    continue
                a = Alert.load(raw)
                if (status and a.status != status) or (detector and a.detector != detector) or (user and a.user != user):
                    continue
                out.append(a)
                if len(out) >= limit:
                    return out
        return out

    def mark(self, alert_id: str, status: str, comment: str, reviewer: str, audit=None) -> Alert:
        """Review an alert: justified or abusive, with a comment. ``audit``: an AuditLog to record it."""
        if status not in REVIEW_STATUSES:
            raise ValueError(f"status must be one of {', '.join(REVIEW_STATUSES)}, not {status!r}")
        comment = (comment or "").strip()
        if not comment or len(comment) > 2000 or any(not c.isprintable() for c in comment):
            raise ValueError("a comment of 1 to 2000 printable characters is required")
        alert = self.get(alert_id)
        if alert is None:
            raise KeyError(f"no privacy alert {alert_id}")
        now = time.time()
        if audit is not None:
            audit.write({"event": "privacy_review", "outcome": "allow", "reason": status, "alert_id": alert_id,
                         "detector": alert.detector, "user": alert.user, "patient": alert.patient,
                         "operator": reviewer, "detail": comment[:500]})
        self.r.hset(self.keys.pv_alert(alert_id), mapping={"status": status, "comment": comment,
                                                           "reviewer": reviewer, "reviewed": repr(now)})
        alert.status, alert.comment, alert.reviewer, alert.reviewed = status, comment, reviewer, now
        return alert

    def prune(self) -> int:
        """Drop queue entries whose alert expired (retention)."""
        return self.r.zremrangebyscore(self.keys.pv_queue, "-inf", time.time() - self.retention - DAY)

    def figures(self, alerts: Iterable[Alert]) -> dict[str, Any]:
        """Per detector: alerts, reviewed, justified, abusive, share abusive among reviewed; and users with
        alerts judged abusive that had another alert within 90 days after (re-offence)."""
        per: dict[str, dict[str, Any]] = {}
        abusive_by_user: dict[str, list[float]] = {}
        by_user: dict[str, list[float]] = {}
        for a in alerts:
            d = per.setdefault(a.detector, {"detector": a.detector, "label": a.label, "alerts": 0, "new": 0,
                                            "justified": 0, "abusive": 0})
            d["alerts"] += 1
            d[a.status if a.status in ("new", "justified", "abusive") else "new"] += 1
            by_user.setdefault(a.user, []).append(a.time)
            if a.status == "abusive":
                abusive_by_user.setdefault(a.user, []).append(a.time)
        for d in per.values():
            reviewed = d["justified"] + d["abusive"]
            d["abusive_share"] = round(d["abusive"] / reviewed, 3) if reviewed else None
        again = sum(1 for u, times in abusive_by_user.items()
                    if any(0 < t - min(times) <= 90 * DAY for t in by_user[u]))
        return {"detectors": sorted(per.values(), key=lambda d: -d["alerts"]),
                "users_with_abusive_alerts": len(abusive_by_user), "reoffended_within_90_days": again}
