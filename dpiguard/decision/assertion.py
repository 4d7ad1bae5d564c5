"""Identity handed by dpiguard to the upstream DPI.

The proxy strips every identity header the client sent (anything under the reserved
``X-DPIGuard-`` prefix and the usual single-sign-on headers such as ``X-Remote-User``)
and adds its own headers plus a short-lived signed assertion.

The assertion is a compact JWT signed with Ed25519 (``alg: EdDSA``), built by hand so
that only one algorithm is ever accepted: the verifier rejects ``none``, HMAC and
anything else before looking at the signature. Claims:

``iss``   always ``"dpiguard"``
``sub``   the authenticated login
``roles`` list of roles
``units`` list of care units
``sid``   prefix of the session id hash (correlates with the audit trail)
``iat``   issued at (epoch seconds)
``exp``   ``iat + ttl`` (default 60 s)
``jti``   random token id
``aud``   the configured audience (typically the upstream origin)

Signing costs a fraction of a millisecond but happens on every forwarded request, so
``AssertionSigner`` reuses a token for the same identity until half of its lifetime has
passed; the upstream therefore always receives a token valid for at least ``ttl / 2``.
"""

from __future__ import annotations

import base64
import binascii
import os
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from pathlib import Path

import orjson
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from dpiguard.signing import key_id

HEADER_USER = "X-DPIGuard-User"
HEADER_ROLES = "X-DPIGuard-Roles"
HEADER_UNITS = "X-DPIGuard-Units"
HEADER_ASSERTION = "X-DPIGuard-Assertion"
HEADER_REQUEST_ID = "X-DPIGuard-Request-Id"
HEADER_BREAK_GLASS = "X-DPIGuard-Break-Glass"

RESERVED_PREFIX = "x-dpiguard-"

DEFAULT_FOREIGN_IDENTITY_HEADERS = (
    "x-remote-user",
    "remote-user",
    "x-forwarded-user",
    "x-auth-request-user",
    "x-auth-request-email",
    "x-forwarded-email",
    "x-user",
    "x-webauth-user",
)

ISSUER = "dpiguard"
ALGORITHM = "EdDSA"
DEFAULT_TTL = 60
SID_PREFIX_LENGTH = 16
_CACHE_MAX_ENTRIES = 4096
_MAX_TOKEN_LENGTH = 8192
_REQUIRED_CLAIMS = ("iss", "sub", "aud", "iat", "exp")


class InvalidAssertion(Exception):
    """The assertion is malformed, forged, expired or meant for someone else."""


def header_key(name: str) -> str:
    """How servers may read a header name: case-insensitive, and ``_`` as ``-`` (CGI/WSGI, PHP, many
    frameworks map ``X_Remote_User`` and ``X-Remote-User`` to the same ``HTTP_X_REMOTE_USER``)."""
    return name.strip().lower().replace("_", "-")


def is_identity_header(name: str, extra: Iterable[str] = ()) -> bool:
    """True if only dpiguard may set the header ``name`` (any case, ``_`` for ``-``)."""
    key = header_key(name)
    if key.startswith(RESERVED_PREFIX):
        return True
    if key in DEFAULT_FOREIGN_IDENTITY_HEADERS:
        return True
    return key in {header_key(header) for header in extra}


# --- encoding helpers -------------------------------------------------------------


def _b64url_encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64url_decode(text: str) -> bytes:
    """Strict base64url decoding (no padding, no foreign characters)."""
    if not text or "=" in text:
        raise InvalidAssertion("malformed assertion: bad base64url segment")
    try:
        raw = text.encode("ascii")
        padded = raw + b"=" * (-len(raw) % 4)
        return base64.b64decode(padded, altchars=b"-_", validate=True)
    except (UnicodeEncodeError, binascii.Error, ValueError) as exc:
        raise InvalidAssertion("malformed assertion: bad base64url segment") from exc


def _decode_json_segment(segment: str, what: str) -> dict:
    try:
        value = orjson.loads(_b64url_decode(segment))
    except orjson.JSONDecodeError as exc:
        raise InvalidAssertion(f"malformed assertion: {what} is not JSON") from exc
    if not isinstance(value, dict):
        raise InvalidAssertion(f"malformed assertion: {what} is not a JSON object")
    return value


# --- signing ----------------------------------------------------------------------


class AssertionSigner:
    """Issues Ed25519-signed identity assertions, reusing fresh ones from a small cache."""

    def __init__(
        self,
        private_key: Ed25519PrivateKey,
        audience: str,
        ttl: int = DEFAULT_TTL,
        kid: str | None = None,
    ) -> None:
        if not isinstance(private_key, Ed25519PrivateKey):
            raise TypeError("private_key must be an Ed25519 private key")
        if ttl <= 0:
            raise ValueError("ttl must be positive")
        self._private_key = private_key
        self.audience = audience
        self.ttl = int(ttl)
        self.kid = kid or key_id(private_key.public_key())
        header = {"alg": ALGORITHM, "typ": "JWT", "kid": self.kid}
        self._header_segment = _b64url_encode(orjson.dumps(header))
        self._cache: OrderedDict[tuple, tuple[str, int]] = OrderedDict()
        self._lock = threading.Lock()

    @classmethod
    def from_pem_file(
        cls, path: str | os.PathLike, audience: str, ttl: int = DEFAULT_TTL
    ) -> AssertionSigner:
        """Load an unencrypted PKCS#8 PEM Ed25519 private key."""
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise ValueError(f"{path}: not an Ed25519 private key")
        return cls(key, audience, ttl=ttl)

    @property
    def public_key(self) -> Ed25519PublicKey:
        return self._private_key.public_key()

    def sign(
        self,
        user: str,
        roles: Sequence[str],
        units: Sequence[str],
        sid_hash: str,
        now: float | None = None,
    ) -> str:
        """Return an assertion for this identity, reusing one issued less than ttl/2 ago."""
        issued_at = int(time.time() if now is None else now)
        cache_key = (user, tuple(roles), tuple(units), sid_hash[:SID_PREFIX_LENGTH])
        with self._lock:
            cached = self._cache.get(cache_key)
            if cached is not None and 0 <= issued_at - cached[1] < self.ttl / 2:
                self._cache.move_to_end(cache_key)
                return cached[0]
        token = self._issue(cache_key, issued_at)
        with self._lock:
            self._cache[cache_key] = (token, issued_at)
            self._cache.move_to_end(cache_key)
            while len(self._cache) > _CACHE_MAX_ENTRIES:
                self._cache.popitem(last=False)
        return token

    def _issue(self, cache_key: tuple, issued_at: int) -> str:
        user, roles, units, sid = cache_key
        claims = {
            "iss": ISSUER,
            "sub": user,
            "aud": self.audience,
            "roles": list(roles),
            "units": list(units),
            "sid": sid,
            "iat": issued_at,
            "exp": issued_at + self.ttl,
            "jti": secrets.token_urlsafe(12),
        }
        signing_input = f"{self._header_segment}.{_b64url_encode(orjson.dumps(claims))}"
        signature = self._private_key.sign(signing_input.encode("ascii"))
        return f"{signing_input}.{_b64url_encode(signature)}"


# --- verification -----------------------------------------------------------------


class AssertionVerifier:
    """Checks assertions issued by ``AssertionSigner`` (used by the upstream)."""

    def __init__(self, public_key: Ed25519PublicKey, audience: str, leeway: int = 5) -> None:
        if not isinstance(public_key, Ed25519PublicKey):
            raise TypeError("public_key must be an Ed25519 public key")
        self._public_key = public_key
        self.audience = audience
        self.leeway = int(leeway)

    @classmethod
    def from_pem_file(cls, path: str | os.PathLike, audience: str) -> AssertionVerifier:
        """Load a PEM SubjectPublicKeyInfo Ed25519 public key."""
        key = serialization.load_pem_public_key(Path(path).read_bytes())
        if not isinstance(key, Ed25519PublicKey):
            raise ValueError(f"{path}: not an Ed25519 public key")
        return cls(key, audience)

    def verify(self, token: str, now: float | None = None) -> dict:
        """Return the claims of a valid assertion; raise ``InvalidAssertion`` otherwise."""
        header_segment, payload_segment, signature = self._split(token)
        header = _decode_json_segment(header_segment, "header")
        if header.get("alg") != ALGORITHM:
            raise InvalidAssertion(f"unsupported algorithm {header.get('alg')!r}")
        signing_input = f"{header_segment}.{payload_segment}".encode("ascii")
        try:
            self._public_key.verify(signature, signing_input)
        except InvalidSignature as exc:
            raise InvalidAssertion("bad signature") from exc
        claims = _decode_json_segment(payload_segment, "payload")
        self._check_claims(claims, time.time() if now is None else now)
        return claims

    @staticmethod
    def _split(token: str) -> tuple[str, str, bytes]:
        if not isinstance(token, str) or not token or len(token) > _MAX_TOKEN_LENGTH:
            raise InvalidAssertion("malformed assertion")
        parts = token.strip().split(".")
        if len(parts) != 3:
            raise InvalidAssertion("malformed assertion: expected three segments")
        header_segment, payload_segment, signature_segment = parts
        if not signature_segment:
            raise InvalidAssertion("malformed assertion: missing signature")
        return header_segment, payload_segment, _b64url_decode(signature_segment)

    def _check_claims(self, claims: dict, now: float) -> None:
        missing = [name for name in _REQUIRED_CLAIMS if name not in claims]
        if missing:
            raise InvalidAssertion(f"missing claims: {', '.join(missing)}")
        if claims["iss"] != ISSUER:
            raise InvalidAssertion(f"wrong issuer {claims['iss']!r}")
        if not _audience_matches(claims["aud"], self.audience):
            raise InvalidAssertion(f"wrong audience {claims['aud']!r}")
        issued_at, expires = claims["iat"], claims["exp"]
        if not _is_number(issued_at) or not _is_number(expires):
            raise InvalidAssertion("malformed assertion: iat/exp must be numbers")
        if now >= expires + self.leeway:
            raise InvalidAssertion("assertion expired")
        not_before = claims.get("nbf", issued_at)
        if not _is_number(not_before) or now + self.leeway < max(issued_at, not_before):
            raise InvalidAssertion("assertion not yet valid")
        if not isinstance(claims["sub"], str) or not claims["sub"]:
            raise InvalidAssertion("malformed assertion: empty subject")
        for name in ("roles", "units"):
            value = claims.get(name, [])
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise InvalidAssertion(f"malformed assertion: {name} must be a list of strings")


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _audience_matches(claim: object, audience: str) -> bool:
    if isinstance(claim, str):
        return claim == audience
    if isinstance(claim, list):
        return audience in claim
    return False
