"""Security keys (WebAuthn / FIDO2 passkeys) as a second factor, with py_webauthn.

* Ceremonies: :meth:`SecurityKeys.begin_registration` / :meth:`finish_registration` and
  :meth:`begin_authentication` / :meth:`finish_authentication`. A challenge is 32 random bytes kept in
  Redis under a random ceremony id with a short TTL (``enrolment.challenge_ttl``) and taken with
  GETDEL: single use, and any instance can finish a ceremony another one began. The relying party id
  and the accepted origins come from the configuration (``enrolment.webauthn_rp_id``, ``origins``).
* Storage: ``P:webauthn:{LOGIN}`` (hash) credential id (base64url) -> JSON ``{"pk", "count", "name",
  "created", "last_used"}``. Several keys per user; listed, renamed, removed.
* Sign count: a counter that does not increase, when either the stored or the new one is non-zero, is
  refused (``sign_count_regression``: a possibly cloned key; the caller traces it). The update is a
  compare-and-set in Lua, so two instances cannot both accept the same counter value.
"""

from __future__ import annotations

import base64
import secrets
import time
from dataclasses import dataclass

import orjson
from webauthn import (
    generate_authentication_options,
    generate_registration_options,
    options_to_json,
    verify_authentication_response,
    verify_registration_response,
)
from webauthn.helpers.exceptions import WebAuthnException
from webauthn.helpers.structs import (
    AuthenticatorSelectionCriteria,
    PublicKeyCredentialDescriptor,
    ResidentKeyRequirement,
    UserVerificationRequirement,
)

from dpiguard.auth.users import is_valid_login, normalize_login
from dpiguard.storage.clients import as_text
from dpiguard.storage.keys import Keys

MAX_KEYS = 10
MAX_NAME = 60
REGISTER = "register"
AUTHENTICATE = "authenticate"

# Outcomes of finish_authentication.
KEY_OK = "ok"
KEY_BAD = "bad_key_assertion"
KEY_UNKNOWN = "unknown_key"
KEY_EXPIRED = "key_challenge_expired"
KEY_CLONED = "sign_count_regression"

# KEYS[1] = the user's keys hash. ARGV = credential id, stored JSON read, new JSON.
# Replace the entry only if it is still the one that was checked: 1 done, 0 changed meanwhile.
_CAS_SCRIPT = """
if redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
return 1
"""


def b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def unb64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass(frozen=True)
class Key:
    id: str
    name: str
    created: int
    last_used: int
    count: int


@dataclass(frozen=True)
class Ceremony:
    id: str  # the ceremony id the page sends back
    options_json: str  # PublicKeyCredential*OptionsJSON for the browser


@dataclass(frozen=True)
class AuthOutcome:
    ok: bool
    reason: str
    login: str = ""
    key_id: str = ""
    detail: str = ""


class SecurityKeys:
    def __init__(self, redis_client, prefix: str, rp_id: str, rp_name: str, origins: list[str],
                 challenge_ttl: int = 120):
        if not rp_id or not origins:
            raise ValueError("security keys need enrolment.webauthn_rp_id and an origin (enrolment.public_url "
                             "or enrolment.webauthn_origins)")
        self.redis = redis_client
        self.keys = Keys(prefix)
        self.rp_id = rp_id
        self.rp_name = rp_name
        self.origins = list(origins)
        self.challenge_ttl = challenge_ttl
        self._cas = redis_client.register_script(_CAS_SCRIPT)

    # -- keys --------------------------------------------------------------------------------------
    def _raw(self, login: str) -> dict[str, str]:
        return {as_text(k): as_text(v) for k, v in self.redis.hgetall(self.keys.security_keys(login)).items()}

    def list(self, login: str) -> list[Key]:
        out = []
        for cid, raw in self._raw(normalize_login(login)).items():
            d = orjson.loads(raw)
            out.append(Key(cid, d.get("name", ""), int(d.get("created", 0)), int(d.get("last_used", 0)),
                           int(d.get("count", 0))))
        return sorted(out, key=lambda k: k.created)

    def has_keys(self, login: str) -> bool:
        login = normalize_login(login)
        return is_valid_login(login) and bool(self.redis.hlen(self.keys.security_keys(login)))

    def remove(self, login: str, key_id: str) -> bool:
        return bool(self.redis.hdel(self.keys.security_keys(normalize_login(login)), key_id))

    def rename(self, login: str, key_id: str, name: str) -> bool:
        login = normalize_login(login)
        key = self.keys.security_keys(login)
        raw = self.redis.hget(key, key_id)
        if raw is None:
            return False
        d = orjson.loads(raw)
        d["name"] = _clean_name(name)
        return bool(self._cas(keys=[key], args=[key_id, as_text(raw), orjson.dumps(d).decode()]))

    def revoke_all(self, login: str) -> int:
        key = self.keys.security_keys(normalize_login(login))
        n = self.redis.hlen(key)
        self.redis.delete(key)
        return int(n)

    # -- challenges --------------------------------------------------------------------------------
    def _store_challenge(self, purpose: str, login: str, challenge: bytes) -> str:
        cid = secrets.token_urlsafe(24)
        self.redis.set(self.keys.webauthn_challenge(cid),
                       orjson.dumps({"p": purpose, "u": login, "c": b64url(challenge)}), ex=self.challenge_ttl)
        return cid

    def _take_challenge(self, cid: str, purpose: str) -> tuple[str, bytes] | None:
        if not isinstance(cid, str) or not 16 <= len(cid) <= 64:
            return None
        raw = self.redis.getdel(self.keys.webauthn_challenge(cid))
        if raw is None:
            return None
        d = orjson.loads(raw)
        if d.get("p") != purpose:
            return None
        return d["u"], unb64url(d["c"])

    # -- registration ------------------------------------------------------------------------------
    def begin_registration(self, login: str, display_name: str = "") -> Ceremony:
        login = normalize_login(login)
        existing = self._raw(login)
        if len(existing) >= MAX_KEYS:
            raise ValueError(f"at most {MAX_KEYS} security keys per user")
        challenge = secrets.token_bytes(32)
        options = generate_registration_options(
            rp_id=self.rp_id, rp_name=self.rp_name, user_name=login, user_display_name=display_name or login,
            user_id=login.encode(), challenge=challenge, timeout=self.challenge_ttl * 1000,
            authenticator_selection=AuthenticatorSelectionCriteria(
                resident_key=ResidentKeyRequirement.DISCOURAGED,
                user_verification=UserVerificationRequirement.PREFERRED),
            exclude_credentials=[PublicKeyCredentialDescriptor(id=unb64url(c)) for c in existing])
        return Ceremony(self._store_challenge(REGISTER, login, challenge), options_to_json(options))

    def finish_registration(self, ceremony_id: str, login: str, credential_json: str, name: str) -> Key:
        """Verify the browser's answer and store the key. ValueError (with the cause) if refused."""
        login = normalize_login(login)
        taken = self._take_challenge(ceremony_id, REGISTER)
        if taken is None or taken[0] != login:
            raise ValueError("the registration expired or was already used; start again")
        try:
            verified = verify_registration_response(credential=credential_json, expected_challenge=taken[1],
                                                    expected_rp_id=self.rp_id, expected_origin=self.origins)
        except (WebAuthnException, ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"the security key's answer was refused: {exc}") from exc
        cid = b64url(verified.credential_id)
        now = int(time.time())
        entry = {"pk": b64url(verified.credential_public_key), "count": verified.sign_count,
                 "name": _clean_name(name), "created": now, "last_used": 0}
        if not self.redis.hsetnx(self.keys.security_keys(login), cid, orjson.dumps(entry)):
            raise ValueError("this security key is already registered")
        return Key(cid, entry["name"], now, 0, verified.sign_count)

    # -- authentication ----------------------------------------------------------------------------
    def begin_authentication(self, login: str) -> Ceremony | None:
        """A challenge for ``login``'s keys; None if the user has none."""
        login = normalize_login(login)
        existing = self._raw(login)
        if not existing:
            return None
        challenge = secrets.token_bytes(32)
        options = generate_authentication_options(
            rp_id=self.rp_id, challenge=challenge, timeout=self.challenge_ttl * 1000,
            allow_credentials=[PublicKeyCredentialDescriptor(id=unb64url(c)) for c in existing],
            user_verification=UserVerificationRequirement.PREFERRED)
        return Ceremony(self._store_challenge(AUTHENTICATE, login, challenge), options_to_json(options))

    def finish_authentication(self, ceremony_id: str, login: str, credential_json: str) -> AuthOutcome:
        login = normalize_login(login)
        taken = self._take_challenge(ceremony_id, AUTHENTICATE)
        if taken is None or taken[0] != login:
            return AuthOutcome(False, KEY_EXPIRED, login)
        try:
            cred = orjson.loads(credential_json)
            cid = cred["id"] if isinstance(cred, dict) and isinstance(cred.get("id"), str) else ""
        except orjson.JSONDecodeError:
            cid = ""
        key = self.keys.security_keys(login)
        raw = self.redis.hget(key, cid) if cid and len(cid) <= 1400 else None
        if raw is None:
            return AuthOutcome(False, KEY_UNKNOWN, login, cid[:64])
        stored = orjson.loads(raw)
        try:
            verified = verify_authentication_response(
                credential=credential_json, expected_challenge=taken[1], expected_rp_id=self.rp_id,
                expected_origin=self.origins, credential_public_key=unb64url(stored["pk"]),
                credential_current_sign_count=0)  # the counter is checked below, and traced apart
        except (WebAuthnException, ValueError, KeyError, TypeError) as exc:
            return AuthOutcome(False, KEY_BAD, login, cid[:64], str(exc)[:200])
        old, new = int(stored.get("count", 0)), int(verified.new_sign_count)
        if (old or new) and new <= old:
            return AuthOutcome(False, KEY_CLONED, login, cid[:64], f"sign count {new} after {old}")
        stored.update(count=new, last_used=int(time.time()))
        if not self._cas(keys=[key], args=[cid, as_text(raw), orjson.dumps(stored).decode()]):
            return AuthOutcome(False, KEY_CLONED, login, cid[:64], "key used at the same time elsewhere")
        return AuthOutcome(True, KEY_OK, login, cid[:64])


def _clean_name(name: str) -> str:
    name = "".join(c for c in (name or "").strip() if c.isprintable())[:MAX_NAME]
    return name
