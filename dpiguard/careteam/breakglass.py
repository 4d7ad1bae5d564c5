"""Emergency-access grants ("bris de glace") in Redis, and their review queue.

A grant opens the configured categories of one patient to one user for ``duration_seconds``
(``policies/breakglass.yaml``, read by :mod:`dpiguard.policy.breakglass`); how a grant is asked for
and decided is :mod:`dpiguard.decision.breakglass`.

Key layout (``P`` = prefix, see docs/architecture.md):

- ``P:bg:{LOGIN}``      hash patient → orjson grant (``id``, ``reason``, ``text``, ``categories``,
                         ``actions``, ``start``, ``end``); the current grant per patient; the key
                         expires with its last grant
- ``P:bg:grant:{ID}``   hash: ``grant`` (orjson, with ``user`` and ``patient``), ``status``
                         (``pending``/``justified``/``abusive``), ``review_comment``, ``reviewed_by``,
                         ``reviewed_at``, ``revoked_at``, ``revoked_by``
- ``P:bg:review``       sorted set grant id → start time (the review queue)

The grant of a user is one transaction on ``P:bg:{LOGIN}``; the review record and queue (other
Redis Cluster slots) are written before it when a grant opens, and after it when one is revoked, so a
grant is never in force without its review entry. Every write publishes ``patient:P`` and ``user:U``
after it committed. A grant's *end* needs no
message: the request path bounds its cache entries by the grant end (``valid_until``), so expiry
takes effect on every instance by the clock alone.
"""

from __future__ import annotations

import re
import secrets
import time
from dataclasses import dataclass
from typing import Any

import orjson
import redis

from dpiguard.storage.batch import publish_each, run_stages
from dpiguard.storage.bus import format_event
from dpiguard.storage.clients import as_text
from dpiguard.storage.keys import Keys

_GRANT_ID_RE = re.compile(r"BG[0-9a-f]{16}")
MAX_TEXT = 2000


# ------------------------------------------------------------------------------------ grants

@dataclass(frozen=True)
class Grant:
    id: str
    user: str
    patient: str
    reason: str
    text: str
    categories: tuple[str, ...]
    actions: tuple[str, ...]
    start: float
    end: float

    def covers(self, category: str, action: str, now: float) -> bool:
        return self.start <= now < self.end and category in self.categories and action in self.actions

    def as_dict(self) -> dict:
        return {"id": self.id, "user": self.user, "patient": self.patient, "reason": self.reason,
                "text": self.text, "categories": list(self.categories), "actions": list(self.actions),
                "start": self.start, "end": self.end}

    def dumps(self) -> bytes:
        return orjson.dumps(self.as_dict())


class BreakGlassDataError(ValueError):
    """A stored grant is malformed (the request path refuses: fail closed)."""


def parse_grant(raw: Any, what: str = "grant") -> Grant:
    try:
        d = orjson.loads(raw)
        if not isinstance(d, dict):
            raise ValueError("not a JSON object")
        grant = Grant(str(d["id"]), str(d["user"]), str(d["patient"]), str(d["reason"]), str(d["text"]),
                      tuple(str(c) for c in d["categories"]), tuple(str(a) for a in d["actions"]),
                      float(d["start"]), float(d["end"]))
    except (KeyError, TypeError, ValueError, orjson.JSONDecodeError) as exc:
        raise BreakGlassDataError(f"{what}: malformed ({exc})") from None
    return grant



class BreakGlassStore:
    """Grants and the review queue in Redis (see the module docstring for the layout)."""

    def __init__(self, redis_client: redis.Redis, prefix: str = "dpiguard"):
        self.redis = redis_client
        self.prefix = prefix
        self.keys = Keys(prefix)
        self.channel = self.keys.events

    @staticmethod
    def new_id() -> str:
        return "BG" + secrets.token_hex(8)

    # -- writes ------------------------------------------------------------------------------------
    def create(self, grant: Grant) -> None:
        """Store the grant (replacing the user's previous grant for this patient), queue it for
        review, then publish ``patient:P`` and ``user:U``."""
        user_key = self.keys.grants_of(grant.user)

        def write(pipe: redis.client.Pipeline) -> None:
            current = pipe.hgetall(user_key)
            expired = []
            last_end = grant.end
            for patient, raw in current.items():
                try:
                    end = parse_grant(raw).end
                except BreakGlassDataError:
                    end = 0.0  # unreadable: drop it (a missing grant refuses, never allows)
                if end <= grant.start and as_text(patient) != grant.patient:
                    expired.append(patient)
                elif as_text(patient) != grant.patient:
                    last_end = max(last_end, end)
            pipe.multi()
            if expired:
                pipe.hdel(user_key, *expired)
            pipe.hset(user_key, grant.patient, grant.dumps())
            # Relative TTL (independent of the Redis server's clock): the key outlives its last grant.
            pipe.expire(user_key, int(last_end - grant.start) + 60)

        # The review record and the queue entry first (other slots), then the grant itself: a grant
        # is never in force without its review entry (a failure in between leaves a review entry of a
        # grant that never opened, which reviewers see; nothing is opened unreviewed).
        run_stages(self.redis, [
            lambda pipe: pipe.hset(self.keys.grant(grant.id), mapping={"grant": grant.dumps(), "status": "pending"}),
            lambda pipe: pipe.zadd(self.keys.grant_review, {grant.id: grant.start}),
        ])
        self.redis.transaction(write, user_key)
        self._publish(grant.patient, grant.user)

    def revoke(self, grant_id: str, by: str, now: float | None = None) -> Grant:
        """End a grant at once, on every instance. KeyError if unknown."""
        now = time.time() if now is None else now
        grant = self.get(grant_id)["grant"]
        user_key = self.keys.grants_of(grant.user)

        def write(pipe: redis.client.Pipeline) -> None:
            raw = pipe.hget(user_key, grant.patient)
            current = None
            if raw is not None:
                try:
                    current = parse_grant(raw).id
                except BreakGlassDataError:
                    current = grant.id  # unreadable: remove it too
            pipe.multi()
            if current == grant.id:
                pipe.hdel(user_key, grant.patient)

        # The grant ends first (its user's slot), then its review record says so (the grant's slot);
        # revoking again after a failure in between is safe.
        self.redis.transaction(write, user_key)
        self.redis.hset(self.keys.grant(grant.id), mapping={"revoked_at": str(now), "revoked_by": by})
        self._publish(grant.patient, grant.user)
        return grant

    def mark(self, grant_id: str, status: str, comment: str, by: str, now: float | None = None) -> None:
        if status not in ("justified", "abusive"):
            raise ValueError("the review verdict must be 'justified' or 'abusive'")
        comment = (comment or "").strip()
        if not comment:
            raise ValueError("a review needs a comment (--comment TEXT)")
        if len(comment) > MAX_TEXT:
            raise ValueError(f"the comment must have at most {MAX_TEXT} characters")
        self.get(grant_id)  # KeyError if unknown
        self.redis.hset(self.keys.grant(grant_id), mapping={
            "status": status, "review_comment": comment, "reviewed_by": by,
            "reviewed_at": str(time.time() if now is None else now)})

    def _publish(self, patient: str, user: str) -> None:
        publish_each(self.redis, self.channel, [format_event("patient", patient), format_event("user", user)])

    # -- reads -------------------------------------------------------------------------------------
    def current(self, login: str, patient: str) -> Grant | None:
        raw = self.redis.hget(self.keys.grants_of(login), patient)
        return None if raw is None else parse_grant(raw, f"grant of {login} for {patient}")

    def get(self, grant_id: str) -> dict:
        """The review record of a grant: ``{"grant": Grant, "status", ...}``. KeyError if unknown."""
        if not isinstance(grant_id, str) or not _GRANT_ID_RE.fullmatch(grant_id):
            raise KeyError(f"no emergency access {grant_id!r} (ids look like BG0123456789abcdef)")
        fields = {as_text(k): as_text(v) for k, v in self.redis.hgetall(self.keys.grant(grant_id)).items()}
        if not fields:
            raise KeyError(f"no emergency access {grant_id!r}")
        return self._record(grant_id, fields)

    @staticmethod
    def _record(grant_id: str, fields: dict) -> dict:
        record = {k: v for k, v in fields.items() if k != "grant"}
        record["grant"] = parse_grant(fields.get("grant"), f"grant {grant_id}")
        for key in ("revoked_at", "reviewed_at"):
            if record.get(key):
                record[key] = float(record[key])
        return record

    def review_queue(self, pending_only: bool = False, limit: int = 1000) -> list[dict]:
        """Review records, oldest first (``pending_only``: not yet marked)."""
        ids = [as_text(i) for i in self.redis.zrange(self.keys.grant_review, 0, -1)]
        pipe = self.redis.pipeline(transaction=False)
        for grant_id in ids:
            pipe.hgetall(self.keys.grant(grant_id))
        out = []
        for grant_id, raw in zip(ids, pipe.execute()):
            if not raw:
                continue
            record = self._record(grant_id, {as_text(k): as_text(v) for k, v in raw.items()})
            if pending_only and record.get("status") != "pending":
                continue
            out.append(record)
        return out[-limit:] if limit else out
