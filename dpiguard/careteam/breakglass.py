"""Emergency access ("bris de glace"): a time-limited, reviewed exception to the care-team rule.

When a request is refused with ``not_in_care_team``, a clinician whose roles allow it may ask for
emergency access to that patient (refusal page form, or ``POST /_dpiguard/api/breakglass``): a reason
from ``policies/breakglass.yaml``, a free-text justification of a minimum length, and a fresh TOTP
code (single use, same anti-replay as the login; a wrong code counts as a login failure and three
lock the account). The grant opens the configured categories of that patient to that user for
``duration_seconds`` (default 4 h), on every instance.

Key layout (``P`` = prefix, see docs/architecture.md):

- ``P:bg:{LOGIN}``      hash patient → orjson grant (``id``, ``reason``, ``text``, ``categories``,
                         ``actions``, ``start``, ``end``); the current grant per patient; the key
                         expires with its last grant
- ``P:bg:grant:{ID}``   hash: ``grant`` (orjson, with ``user`` and ``patient``), ``status``
                         (``pending``/``justified``/``abusive``), ``review_comment``, ``reviewed_by``,
                         ``reviewed_at``, ``revoked_at``, ``revoked_by``
- ``P:bg:review``       sorted set grant id → start time (the review queue)

Every write publishes ``patient:P`` and ``user:U`` after it committed. A grant's *end* needs no
message: the request path bounds its cache entries by the grant end (``valid_until``), so expiry
takes effect on every instance by the clock alone.

Alerting: each grant writes an ``event: break_glass`` trace record with ``alert: true`` and a WARNING
log line; each request made under it carries ``break_glass: true`` in its trace record and the
``X-DPIGuard-Break-Glass: ID`` header upstream.
"""

from __future__ import annotations

import logging
import re
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import orjson
import redis

from dpiguard.storage.bus import events_channel, format_event
from dpiguard.policy.routes import ACTIONS, LineDict, PolicyError, load_yaml, read_policy_file

log = logging.getLogger("dpiguard")

FILE_NAME = "breakglass.yaml"
API_PATH = "/_dpiguard/api/breakglass"
FORM_PATH = "/_dpiguard/breakglass"
STATUSES = ("pending", "justified", "abusive")
_NAME_RE = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
_ID_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
_GRANT_ID_RE = re.compile(r"BG[0-9a-f]{16}")
MAX_TEXT = 2000
MAX_DURATION = 7 * 86400


# ------------------------------------------------------------------------------------ the policy file

@dataclass(frozen=True)
class BreakGlassPolicy:
    enabled: bool = False
    reasons: Mapping[str, str] = field(default_factory=dict)  # code → label, in file order
    justification_min_length: int = 20
    duration_seconds: float = 14400
    categories: frozenset[str] = frozenset()
    actions: frozenset[str] = frozenset({"read"})
    never_roles: frozenset[str] = frozenset()
    override_patient_objection: bool = False
    source: str = ""  # file it came from ("" = no file: emergency access off)

    @classmethod
    def disabled(cls) -> "BreakGlassPolicy":
        return cls()

    def roles_allowed(self, roles: Iterable[str]) -> bool:
        """True unless one of ``roles`` may never use emergency access."""
        roles = tuple(roles)
        return bool(roles) and not any(r in self.never_roles for r in roles)

    def reachable(self, category: str | None, action: str | None) -> bool:
        return self.enabled and category in self.categories and action in self.actions

    @classmethod
    def load(cls, directory: str | Path, roles: Iterable[str], categories: Iterable[str]) -> "BreakGlassPolicy":
        """Read ``directory/breakglass.yaml``; no file = emergency access off. PolicyError (file, line)
        on any mistake, including a role or category not declared in categories.yaml."""
        path = Path(directory) / FILE_NAME
        if not path.exists():
            return cls.disabled()
        label = str(path)
        _, text = read_policy_file(path)
        data = load_yaml(text, label)
        known = {"enabled", "reasons", "justification_min_length", "duration_seconds", "categories",
                 "actions", "never_roles", "override_patient_objection"}
        for key in data:
            if key not in known:
                raise PolicyError(label, data.line_of(key), f"unknown setting {key!r} (known: {', '.join(sorted(known))})")
        for key in known:
            if key not in data:
                raise PolicyError(label, None, f"the setting {key!r} is missing")

        def boolean(key: str) -> bool:
            if not isinstance(data[key], bool):
                raise PolicyError(label, data.line_of(key), f"'{key}' must be true or false")
            return data[key]

        def number(key: str, low: float, high: float) -> int:
            value = data[key]
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise PolicyError(label, data.line_of(key), f"'{key}' must be a whole number from {low} to {high}")
            return value

        def names(key: str, allowed: Iterable[str], what: str, empty_ok: bool) -> frozenset[str]:
            value = data[key]
            if value is None and empty_ok:
                return frozenset()
            if not isinstance(value, list) or (not value and not empty_ok):
                raise PolicyError(label, data.line_of(key), f"'{key}' must be a list of {what}s (one '- name' per line)")
            allowed = set(allowed)
            lines = getattr(value, "item_lines", None) or [data.line_of(key)] * len(value)
            out = set()
            for item, line in zip(value, lines):
                if not isinstance(item, str) or item not in allowed:
                    raise PolicyError(label, line, f"'{key}': unknown {what} {item!r} "
                                                   f"(known: {', '.join(sorted(allowed))})")
                if item in out:
                    raise PolicyError(label, line, f"'{key}': {item!r} is written twice")
                out.add(item)
            return frozenset(out)

        enabled = boolean("enabled")
        reasons_raw = data["reasons"]
        if not isinstance(reasons_raw, LineDict) or not reasons_raw:
            raise PolicyError(label, data.line_of("reasons"), "'reasons' must list at least one 'code: label' line")
        reasons: dict[str, str] = {}
        for code, text_label in reasons_raw.items():
            line = reasons_raw.line_of(code)
            if not isinstance(code, str) or not _NAME_RE.match(code):
                raise PolicyError(label, line, f"reason code {code!r} must be lowercase letters, digits or '_'")
            if not isinstance(text_label, str) or not text_label.strip() or len(text_label) > 200:
                raise PolicyError(label, line, f"reason {code!r} needs a label text (at most 200 characters)")
            reasons[code] = text_label.strip()
        min_length = number("justification_min_length", 1, 1000)
        duration = number("duration_seconds", 1, MAX_DURATION)
        cats = names("categories", categories, "category", empty_ok=False)
        actions = names("actions", ACTIONS, "action", empty_ok=False)
        never = names("never_roles", roles, "role", empty_ok=True)
        override = boolean("override_patient_objection")
        return cls(enabled, reasons, min_length, float(duration), cats, actions, never, override, label)


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


def _text(value: Any) -> str | None:
    return value.decode() if isinstance(value, bytes) else value


class BreakGlassStore:
    """Grants and the review queue in Redis (see the module docstring for the layout)."""

    def __init__(self, redis_client: redis.Redis, prefix: str = "dpiguard"):
        self.redis = redis_client
        self.prefix = prefix
        self.channel = events_channel(prefix)

    def key_user(self, login: str) -> str:
        return f"{self.prefix}:bg:{{{login}}}"

    def key_grant(self, grant_id: str) -> str:
        return f"{self.prefix}:bg:grant:{{{grant_id}}}"

    @property
    def key_review(self) -> str:
        return f"{self.prefix}:bg:review"

    @staticmethod
    def new_id() -> str:
        return "BG" + secrets.token_hex(8)

    # -- writes ------------------------------------------------------------------------------------
    def create(self, grant: Grant) -> None:
        """Store the grant (replacing the user's previous grant for this patient), queue it for
        review, then publish ``patient:P`` and ``user:U``."""
        user_key = self.key_user(grant.user)

        def write(pipe: redis.client.Pipeline) -> None:
            current = pipe.hgetall(user_key)
            expired = []
            last_end = grant.end
            for patient, raw in current.items():
                try:
                    end = parse_grant(raw).end
                except BreakGlassDataError:
                    end = 0.0  # unreadable: drop it (a missing grant refuses, never allows)
                if end <= grant.start and _text(patient) != grant.patient:
                    expired.append(patient)
                elif _text(patient) != grant.patient:
                    last_end = max(last_end, end)
            pipe.multi()
            if expired:
                pipe.hdel(user_key, *expired)
            pipe.hset(user_key, grant.patient, grant.dumps())
            # Relative TTL (independent of the Redis server's clock): the key outlives its last grant.
            pipe.expire(user_key, int(last_end - grant.start) + 60)
            pipe.hset(self.key_grant(grant.id), mapping={"grant": grant.dumps(), "status": "pending"})
            pipe.zadd(self.key_review, {grant.id: grant.start})

        self.redis.transaction(write, user_key)
        self._publish(grant.patient, grant.user)

    def revoke(self, grant_id: str, by: str, now: float | None = None) -> Grant:
        """End a grant at once, on every instance. KeyError if unknown."""
        now = time.time() if now is None else now
        grant = self.get(grant_id)["grant"]
        user_key = self.key_user(grant.user)

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
            pipe.hset(self.key_grant(grant.id), mapping={"revoked_at": str(now), "revoked_by": by})

        self.redis.transaction(write, user_key)
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
        self.redis.hset(self.key_grant(grant_id), mapping={
            "status": status, "review_comment": comment, "reviewed_by": by,
            "reviewed_at": str(time.time() if now is None else now)})

    def _publish(self, patient: str, user: str) -> None:
        pipe = self.redis.pipeline(transaction=False)
        pipe.publish(self.channel, format_event("patient", patient))
        pipe.publish(self.channel, format_event("user", user))
        pipe.execute()

    # -- reads -------------------------------------------------------------------------------------
    def current(self, login: str, patient: str) -> Grant | None:
        raw = self.redis.hget(self.key_user(login), patient)
        return None if raw is None else parse_grant(raw, f"grant of {login} for {patient}")

    def get(self, grant_id: str) -> dict:
        """The review record of a grant: ``{"grant": Grant, "status", ...}``. KeyError if unknown."""
        if not isinstance(grant_id, str) or not _GRANT_ID_RE.fullmatch(grant_id):
            raise KeyError(f"no emergency access {grant_id!r} (ids look like BG0123456789abcdef)")
        fields = {_text(k): _text(v) for k, v in self.redis.hgetall(self.key_grant(grant_id)).items()}
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
        ids = [_text(i) for i in self.redis.zrange(self.key_review, 0, -1)]
        pipe = self.redis.pipeline(transaction=False)
        for grant_id in ids:
            pipe.hgetall(self.key_grant(grant_id))
        out = []
        for grant_id, raw in zip(ids, pipe.execute()):
            if not raw:
                continue
            record = self._record(grant_id, {_text(k): _text(v) for k, v in raw.items()})
            if pending_only and record.get("status") != "pending":
                continue
            out.append(record)
        return out[-limit:] if limit else out


# ------------------------------------------------------------------------------------ the request

@dataclass
class RequestOutcome:
    ok: bool
    status: int
    error: str = ""
    message: str = ""
    grant: Grant | None = None
    retry_after: int = 0


class BreakGlassService:
    """Decides and records a request for emergency access (used by the portal, in a worker thread)."""

    def __init__(self, *, policy: BreakGlassPolicy, store: BreakGlassStore, objections, careteam,
                 authenticator, audit, on_grant=None):
        self.policy = policy
        # Called with (user, patient) after a grant is stored: drops this instance's cached decisions at
        # once (its own bus message may arrive after the client's next request).
        self.on_grant = on_grant
        self.store = store
        self.objections = objections
        self.careteam = careteam
        self.authenticator = authenticator
        self.audit = audit
        self.grants_issued = 0  # emergency accesses opened by this instance (metrics)

    def offer(self, reason: str, roles: Iterable[str], patient: str | None, category: str | None,
              action: str | None) -> bool:
        """Should a refusal offer emergency access to this user?"""
        p = self.policy
        if not patient or not p.reachable(category, action) or not p.roles_allowed(roles):
            return False
        return reason == "not_in_care_team" or (reason == "patient_objection" and p.override_patient_objection)

    def request(self, *, user: str, roles: Iterable[str], patient: Any, reason: Any, text: Any, totp: Any,
                client_ip: str, request_id: str, now: float | None = None) -> RequestOutcome:
        """Validate, check the TOTP code, check objections, then grant. Every outcome is traced."""
        now = time.time() if now is None else now
        p = self.policy
        roles = tuple(roles)
        patient = patient.strip() if isinstance(patient, str) else ""
        reason = reason.strip() if isinstance(reason, str) else ""
        text = text.strip() if isinstance(text, str) else ""
        base = {"request_id": request_id, "user": user, "roles": list(roles), "patient": patient[:64] or None,
                "client": client_ip, "break_glass_reason": reason[:64] or None}

        def refuse(status: int, error: str, message: str, detail: str | None = None, retry_after: int = 0):
            self.audit.write({"event": "break_glass_request", "outcome": "deny", "reason": error, **base,
                              "detail": detail})
            return RequestOutcome(False, status, error, message, retry_after=retry_after)

        if not p.enabled:
            return refuse(404, "break_glass_disabled", "Emergency access is not enabled here.")
        if not p.roles_allowed(roles):
            return refuse(403, "break_glass_forbidden", "Your role may not use emergency access.")
        if not _ID_RE.fullmatch(patient):
            return refuse(400, "invalid_request", "Unknown or missing patient id.")
        if reason not in p.reasons:
            return refuse(400, "invalid_request", "Choose a reason from the list: " + ", ".join(p.reasons))
        if len(text) < p.justification_min_length:
            return refuse(400, "invalid_request",
                          f"The justification needs at least {p.justification_min_length} characters.")
        if len(text) > MAX_TEXT or any(not c.isprintable() for c in text):
            return refuse(400, "invalid_request",
                          f"The justification must be plain text of at most {MAX_TEXT} characters.")
        # Objection before the code: a request that cannot succeed does not burn the user's code.
        units = self.careteam.user_units(user, now)
        objection = self.objections.find(patient, user, units)
        if objection is not None and not p.override_patient_objection:
            return refuse(403, "patient_objection",
                          "The patient has objected to your access; emergency access cannot override it.",
                          f"objection:{objection.field}")
        code = totp.strip() if isinstance(totp, str) else ""
        result = self.authenticator.reauthenticate(user, code, client_ip, now=now)
        if not result.ok:
            if result.retry_after:
                return refuse(429, result.reason, "Too many failed attempts; try again later.",
                              result.detail, result.retry_after)
            return refuse(401, "invalid_totp", "The authenticator code is incorrect or was already used.",
                          result.detail)
        grant = Grant(self.store.new_id(), user, patient, reason, text, tuple(sorted(p.categories)),
                      tuple(sorted(p.actions)), now, now + p.duration_seconds)
        # Trace first: an emergency access may never exist without its alert line.
        self.audit.write({"event": "break_glass", "outcome": "allow", "reason": reason, "alert": True, **base,
                          "break_glass_id": grant.id, "break_glass_text": text,
                          "break_glass_label": p.reasons[reason], "categories": list(grant.categories),
                          "expires": grant.end,
                          "objection_overridden": objection.field if objection is not None else None})
        self.store.create(grant)
        self.grants_issued += 1
        if self.on_grant is not None:
            self.on_grant(user, patient)
        log.warning("dpiguard: EMERGENCY ACCESS (bris de glace) %s: user %s opened patient %s for %d s, "
                    "reason %s: %s", grant.id, user, patient, int(p.duration_seconds), reason, text[:200])
        return RequestOutcome(True, 201, grant=grant)
