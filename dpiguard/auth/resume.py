"""Forms kept while their author logs in again: a note typed when the session ended is not lost.

A browser form (``application/x-www-form-urlencoded``, ``multipart/form-data`` or ``text/plain``) sent
with a session that ended by inactivity is kept, encrypted, in ``P:resume:{ID}`` (TTL
``sessions.resume_seconds``) with the login of the session's owner (``SessionStore.owner_of_ended``).
The browser is sent to the login page with the id. When that same person logs in, the form is taken
(GETDEL: once, on whichever instance) and sent on as the original request, decided and traced like any
other (``dpiguard/edge/resume.py``). Another user logging in with the id gets nothing and the form is
dropped; a form is never kept for a session that was logged out or revoked, nor for a request without
the ended session's cookie, nor from another site (Fetch Metadata), nor above ``resume_max_bytes``.
"""

from __future__ import annotations

import base64
import secrets
import time
from dataclasses import dataclass

import orjson

from dpiguard.auth.users import SecretBox
from dpiguard.storage.clients import as_text
from dpiguard.storage.keys import Keys

FORM_TYPES = ("application/x-www-form-urlencoded", "multipart/form-data", "text/plain")
ID_BYTES = 24


@dataclass(frozen=True)
class KeptForm:
    id: str
    owner: str
    method: str
    target: str
    content_type: str
    body: bytes
    created: float
    request_id: str


def is_form(content_type: str) -> bool:
    return content_type.split(";", 1)[0].strip().lower() in FORM_TYPES


class ResumeStore:
    def __init__(self, redis_client, box: SecretBox, prefix: str = "dpiguard", ttl: int = 900,
                 max_bytes: int = 65536):
        self.redis = redis_client
        self.box = box
        self.keys = Keys(prefix)
        self.ttl = ttl
        self.max_bytes = max_bytes

    @property
    def enabled(self) -> bool:
        return self.ttl > 0

    def keep(self, owner: str, method: str, target: str, content_type: str, body: bytes, request_id: str,
             now: float | None = None) -> str:
        """Store the form; returns its id (for the login page)."""
        if len(body) > self.max_bytes:
            raise ValueError("form too large to keep")
        resume_id = secrets.token_urlsafe(ID_BYTES)
        payload = orjson.dumps({"owner": owner, "method": method, "target": target, "content_type": content_type,
                                "body": base64.b64encode(body).decode(), "request_id": request_id,
                                "created": time.time() if now is None else now})
        sealed = self.box.encrypt(payload.decode(), aad=resume_id)
        self.redis.set(self.keys.resume(resume_id), sealed, ex=self.ttl)
        return resume_id

    def take(self, resume_id: str, user: str) -> KeptForm | None:
        """The kept form, once, if ``user`` is its owner; None otherwise (and the form is gone)."""
        if not isinstance(resume_id, str) or not resume_id or len(resume_id) > 64 or not resume_id.replace(
                "-", "").replace("_", "").isalnum():
            return None
        raw = as_text(self.redis.getdel(self.keys.resume(resume_id)))
        if raw is None:
            return None
        try:
            d = orjson.loads(self.box.decrypt(raw, aad=resume_id))
            form = KeptForm(resume_id, str(d["owner"]), str(d["method"]), str(d["target"]), str(d["content_type"]),
                            base64.b64decode(d["body"]), float(d["created"]), str(d.get("request_id") or ""))
        except (ValueError, KeyError, TypeError):
            return None  # tampered or unreadable: nothing is sent
        return form if form.owner == user else None
