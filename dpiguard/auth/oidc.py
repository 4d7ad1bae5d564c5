"""OpenID Connect relying party (authorization code + PKCE), with a Pro Santé Connect profile.

No mitmproxy here: the HTTP routes are in :mod:`dpiguard.edge.oidc`; the portal serves them in its
worker threads, so every blocking call to the IdP below (discovery, JWKS, token, userinfo) runs off the
event loop, each with ``oidc.http_timeout``.

JOSE (signatures, keys, claims) is done by ``joserfc`` — the JOSE library of the Authlib project, which
Authlib itself uses and recommends in place of its deprecated ``authlib.jose`` — never by hand:

* the id_token's ``alg`` must be in ``oidc.algorithms`` (asymmetric only: no ``none``, no HS*, checked
  by the configuration and again here, before any key is looked at);
* its key comes from the IdP's JWKS (``jwks_uri`` of the discovery document), cached ``jwks_max_age``
  seconds and fetched again when a token names an unknown ``kid`` (at most once per
  ``jwks_refresh_seconds``), so a key rotation at the IdP works without a restart;
* claims: ``iss`` = the configured issuer, ``aud`` contains the client id (and ``azp`` = client id when
  there are several audiences or when ``azp`` is present), ``exp``, ``iat`` (not in the future), and
  ``nonce`` = the one of this flow, with ``oidc.clock_skew`` seconds of leeway.

Flow state lives in Redis so that any instance may finish a flow begun on another:

* ``P:oidc-flow:{STATE}`` (string, JSON, TTL ``flow_seconds``): nonce, PKCE verifier, next target and
  the hash of the browser-binding cookie; taken with GETDEL, so a state serves once;
* ``P:oidc-pending:{ID}`` (string, JSON, TTL ``flow_seconds``): an identity verified by the IdP that still
  has to type a dpiguard TOTP code (its IdP did not vouch for a second factor);
* ``P:oidc-session:{SIDHASH}`` (hash, TTL = session lifetime): the id_token (for ``id_token_hint`` at
  logout), the IdP's ``sid`` and ``sub`` of a dpiguard session;
* ``P:oidc-sid:{SID}`` and ``P:oidc-sub:{SUB}`` (sets, TTL = session lifetime): the dpiguard sessions of an
  IdP session / subject, for back-channel logout;
* ``P:oidc-jti:{JTI}`` (string, TTL 2 × max age of a logout token): a logout token's ``jti`` already used.

Pro Santé Connect claims supported (``profile: psc``), from the id_token and the userinfo answer:

* ``SubjectNameID`` (e.g. ``"810002909371"``: the national identifier, ``8`` + RPPS number) or, failing
  it, ``preferred_username``: the RPPS written in the session (the leading ``8`` of an 8-prefixed
  12-character national id is dropped to give the 11-digit RPPS);
* ``SubjectRefPro``: ``{"exercices": [{"codeProfession": "10", "codeCategorieProfessionnelle": "C",
  "codeSavoirFaire": "SM54", "activities": [{"codeSecteurDactivite": "SA07", ...}, ...]}, ...]}`` — an
  object, or the same object as a JSON text; ``exercices``/``exercises`` and
  ``activities``/``activites`` are both read, ``codeSecteurDactivite``/``codeSecteurActivite`` too.
  Anything else in it is ignored; a malformed structure gives no exercise (hence no PSC role).
"""

from __future__ import annotations

import base64
import hashlib
import secrets
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping
from urllib.parse import urlencode

import httpx
import orjson
from joserfc import jwk, jws, jwt
from joserfc.errors import JoseError

from dpiguard.storage.clients import as_text
from dpiguard.storage.keys import Keys

BACKCHANNEL_EVENT = "http://schemas.openid.net/event/backchannel-logout"
ASYMMETRIC_ALGS = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512",
                             "EdDSA"})
MAX_TOKEN_BYTES = 16 * 1024
LOGOUT_TOKEN_MAX_AGE = 300  # a logout token older than this (iat) is refused


class OidcError(Exception):
    """A step of the flow failed. ``code`` is a stable machine reason (traced), ``str()`` a detail."""

    def __init__(self, code: str, detail: str = ""):
        self.code = code
        self.detail = detail
        super().__init__(f"{code}: {detail}" if detail else code)


@dataclass(frozen=True)
class OidcSettings:
    """What the relying party needs (from the configuration's ``oidc`` section)."""

    issuer: str
    client_id: str
    redirect_uri: str
    client_secret: str = ""
    token_auth: str = "client_secret_basic"
    private_key_pem: bytes = b""
    post_logout_redirect_uri: str | None = None
    scopes: tuple[str, ...] = ("openid", "profile")
    profile: str = "generic"
    login_claim: str = "preferred_username"
    name_claim: str = "name"
    userinfo: bool = True
    required_acr: str | None = None
    mfa_acr: tuple[str, ...] = ()
    mfa_amr: tuple[str, ...] = ("mfa", "otp", "hwk", "sc", "swk")
    algorithms: tuple[str, ...] = ("RS256", "PS256", "ES256")
    clock_skew: int = 60
    http_timeout: float = 5.0
    flow_seconds: int = 300
    jwks_refresh_seconds: int = 30
    jwks_max_age: int = 3600

    @property
    def source(self) -> str:
        return "psc" if self.profile == "psc" else "oidc"


@dataclass(frozen=True)
class Flow:
    nonce: str
    verifier: str
    next: str
    binding: str  # sha256 of the browser-binding cookie


@dataclass(frozen=True)
class Identity:
    """A verified identity from the IdP."""

    login: str
    display_name: str
    sub: str
    sid: str
    claims: Mapping[str, Any]
    exercises: tuple[Mapping[str, Any], ...]
    rpps: str
    acr: str
    amr: tuple[str, ...]
    id_token: str
    second_factor: bool  # the IdP vouched for a second factor


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def pkce_challenge(verifier: str) -> str:
    return _b64(hashlib.sha256(verifier.encode()).digest())


def binding_hash(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


# -- Pro Santé Connect claims ------------------------------------------------------------------------
def _text(value: Any, limit: int = 64) -> str:
    return str(value).strip()[:limit] if isinstance(value, (str, int)) and not isinstance(value, bool) else ""


def psc_exercises(claims: Mapping[str, Any]) -> tuple[dict[str, Any], ...]:
    """The exercises of ``SubjectRefPro`` as ``{"profession", "category", "savoir_faire", "sectors"}``."""
    ref = claims.get("SubjectRefPro")
    if isinstance(ref, str):
        try:
            ref = orjson.loads(ref)
        except orjson.JSONDecodeError:
            return ()
    if not isinstance(ref, dict):
        return ()
    exercises = ref.get("exercices", ref.get("exercises"))
    if not isinstance(exercises, list):
        return ()
    out = []
    for ex in exercises[:32]:
        if not isinstance(ex, dict):
            continue
        activities = ex.get("activities", ex.get("activites", []))
        sectors = tuple(s for s in (_text(a.get("codeSecteurDactivite", a.get("codeSecteurActivite")))
                                    for a in (activities if isinstance(activities, list) else [])[:64]
                                    if isinstance(a, dict)) if s)
        out.append({"profession": _text(ex.get("codeProfession")),
                    "category": _text(ex.get("codeCategorieProfessionnelle")),
                    "savoir_faire": _text(ex.get("codeSavoirFaire")), "sectors": sectors})
    return tuple(out)


def psc_rpps(claims: Mapping[str, Any]) -> str:
    """The RPPS number from ``SubjectNameID`` (or ``preferred_username``): digits only, else ""."""
    value = _text(claims.get("SubjectNameID")) or _text(claims.get("preferred_username"))
    if not value.isdigit():
        return ""
    if len(value) == 12 and value.startswith("8"):  # national id = type 8 (RPPS) + the 11-digit RPPS
        return value[1:]
    return value[:32]


def _private_key(pem: bytes):
    """The client's private key for private_key_jwt (RSA or EC, PEM)."""
    for kind in ("RSA", "EC"):
        try:
            return jwk.import_key(pem, kind)
        except (JoseError, ValueError, TypeError):
            continue
    raise OidcError("config_error", "oidc.private_key_file: not an RSA or EC private key in PEM")


# -- the relying party ---------------------------------------------------------------------------------
class RelyingParty:
    """One OpenID Connect client. Thread-safe; state of flows and sessions is in Redis."""

    def __init__(self, settings: OidcSettings, redis_client, prefix: str = "dpiguard",
                 http: httpx.Client | None = None, clock: Callable[[], float] = time.time):
        bad = [a for a in settings.algorithms if a not in ASYMMETRIC_ALGS]
        if bad:
            raise ValueError(f"not an accepted signature algorithm: {', '.join(bad)}")
        self.s = settings
        self.redis = redis_client
        self.keys = Keys(prefix)
        self.http = http or httpx.Client(timeout=settings.http_timeout, follow_redirects=False)
        self.clock = clock
        self._lock = threading.Lock()
        self._discovery: dict | None = None
        self._discovery_at = 0.0
        self._jwks: jwk.KeySet | None = None
        self._jwks_at = 0.0
        self._jwks_refetch_at = -1e18

    # -- keys of Redis ------------------------------------------------------------------------------
    def _k(self, kind: str, ident: str) -> str:
        return self.keys.oidc(kind, ident)

    # -- the IdP's documents ---------------------------------------------------------------------------
    def _get_json(self, url: str, what: str, **kw) -> dict:
        try:
            r = self.http.get(url, timeout=self.s.http_timeout, **kw)
        except httpx.HTTPError as exc:
            raise OidcError("idp_unreachable", f"{what}: {type(exc).__name__}: {exc}") from None
        if r.status_code != 200:
            raise OidcError("idp_error", f"{what}: HTTP {r.status_code} from {url}")
        try:
            data = r.json()
        except ValueError:
            raise OidcError("idp_error", f"{what}: not JSON ({url})") from None
        if not isinstance(data, dict):
            raise OidcError("idp_error", f"{what}: not a JSON object ({url})")
        return data

    def discovery(self, refresh: bool = False) -> dict:
        """The discovery document (cached ``jwks_max_age``); OidcError saying what is wrong."""
        with self._lock:
            if not refresh and self._discovery is not None and self.clock() - self._discovery_at < self.s.jwks_max_age:
                return self._discovery
        url = self.s.issuer.rstrip("/") + "/.well-known/openid-configuration"
        doc = self._get_json(url, "discovery document")
        if doc.get("issuer") != self.s.issuer:
            raise OidcError("idp_error", f"discovery document: issuer is {doc.get('issuer')!r}, "
                                         f"the configuration says {self.s.issuer!r}")
        for key in ("authorization_endpoint", "token_endpoint", "jwks_uri"):
            if not isinstance(doc.get(key), str) or not doc[key].startswith(("https://", "http://")):
                raise OidcError("idp_error", f"discovery document: {key!r} is missing or not a URL")
        if "code" not in doc.get("response_types_supported", ["code"]):
            raise OidcError("idp_error", "discovery document: the IdP does not offer response_type 'code'")
        methods = doc.get("code_challenge_methods_supported")
        if methods is not None and "S256" not in methods:
            raise OidcError("idp_error", "discovery document: the IdP does not offer PKCE S256")
        algs = doc.get("id_token_signing_alg_values_supported")
        if isinstance(algs, list) and not set(algs) & set(self.s.algorithms):
            raise OidcError("idp_error", f"discovery document: the IdP signs id_tokens with {algs}, none of "
                                         f"oidc.algorithms ({', '.join(self.s.algorithms)})")
        with self._lock:
            self._discovery, self._discovery_at = doc, self.clock()
        return doc

    def _keyset(self, kid: str | None) -> jwk.KeySet:
        """The JWKS, fetched again if ``kid`` is unknown (at most once per ``jwks_refresh_seconds``)."""
        now = self.clock()
        with self._lock:
            keyset, age = self._jwks, now - self._jwks_at
            known = keyset is not None and (kid is None or any(k.kid == kid for k in keyset.keys))
            stale = keyset is None or age >= self.s.jwks_max_age
            may_refetch = now - self._jwks_refetch_at >= self.s.jwks_refresh_seconds
            if not stale and (known or not may_refetch):
                return keyset
            self._jwks_refetch_at = now
        data = self._get_json(self.discovery()["jwks_uri"], "JWKS")
        try:
            keyset = jwk.KeySet.import_key_set(data)
        except (JoseError, ValueError, TypeError, KeyError) as exc:
            raise OidcError("idp_error", f"JWKS: unusable key set ({exc})") from None
        with self._lock:
            self._jwks, self._jwks_at = keyset, now
        return keyset

    def check_client_key(self) -> None:
        """OidcError unless the private_key_jwt key can sign (``config check``)."""
        if self.s.token_auth == "private_key_jwt":
            _private_key(self.s.private_key_pem)

    def jwks_size(self) -> int:
        """How many keys the IdP's JWKS holds (fetched now; ``config check``)."""
        with self._lock:
            self._jwks = None
        return len(self._keyset(None).keys)

    # -- JOSE --------------------------------------------------------------------------------------
    def _decode(self, token: str, what: str) -> dict:
        """Check the signature of a compact JWS with the IdP's keys; the claims (not yet validated)."""
        if not isinstance(token, str) or len(token) > MAX_TOKEN_BYTES or token.count(".") != 2:
            raise OidcError("invalid_token", f"{what}: not a signed JWT")
        try:
            header = jws.extract_compact(token.encode()).protected
        except (JoseError, ValueError, TypeError):
            raise OidcError("invalid_token", f"{what}: malformed") from None
        alg = header.get("alg")
        if alg not in self.s.algorithms:
            raise OidcError("invalid_token", f"{what}: algorithm {alg!r} not accepted")
        kid = header.get("kid")
        keyset = self._keyset(kid if isinstance(kid, str) else None)
        candidates = [k for k in keyset.keys if (kid is None or k.kid == kid)]
        if not candidates:
            raise OidcError("invalid_token", f"{what}: signed with an unknown key (kid {kid!r})")
        for key in candidates:
            try:
                return dict(jwt.decode(token, key, algorithms=[alg]).claims)
            except JoseError:
                continue
        raise OidcError("invalid_token", f"{what}: bad signature")

    def _validate(self, claims: dict, what: str, **options) -> None:
        registry = jwt.JWTClaimsRegistry(now=int(self.clock()), leeway=self.s.clock_skew,
                                         iss={"essential": True, "value": self.s.issuer}, **options)
        try:
            registry.validate(claims)
        except JoseError as exc:
            code = "expired_token" if type(exc).__name__ == "ExpiredTokenError" else "invalid_token"
            raise OidcError(code, f"{what}: {exc}") from None
        aud = claims.get("aud")
        auds = aud if isinstance(aud, list) else [aud]
        if self.s.client_id not in auds:
            raise OidcError("invalid_token", f"{what}: audience {aud!r} is not this client")
        iat = claims.get("iat")
        if not isinstance(iat, (int, float)) or isinstance(iat, bool) or iat > self.clock() + self.s.clock_skew:
            raise OidcError("invalid_token", f"{what}: 'iat' missing or in the future")

    def verify_id_token(self, id_token: str, nonce: str) -> dict:
        claims = self._decode(id_token, "id_token")
        self._validate(claims, "id_token", sub={"essential": True}, exp={"essential": True},
                       iat={"essential": True})
        auds = claims["aud"] if isinstance(claims["aud"], list) else [claims["aud"]]
        if ("azp" in claims or len(auds) > 1) and claims.get("azp") != self.s.client_id:
            raise OidcError("invalid_token", f"id_token: authorized party {claims.get('azp')!r} is not this client")
        if not isinstance(claims.get("nonce"), str) or not secrets.compare_digest(
                claims["nonce"].encode(), nonce.encode()):
            raise OidcError("wrong_nonce", "id_token: nonce is not the one of this login")
        return claims

    def verify_logout_token(self, token: str) -> tuple[str, str]:
        """A back-channel logout token (OpenID Back-Channel Logout 1.0 §2.6): (sub, sid), either may be ""."""
        claims = self._decode(token, "logout_token")
        self._validate(claims, "logout_token", iat={"essential": True})
        if claims["iat"] < self.clock() - LOGOUT_TOKEN_MAX_AGE - self.s.clock_skew:
            raise OidcError("invalid_token", "logout_token: too old")
        events = claims.get("events")
        if not isinstance(events, dict) or not isinstance(events.get(BACKCHANNEL_EVENT), dict):
            raise OidcError("invalid_token", "logout_token: no back-channel logout event")
        if "nonce" in claims:
            raise OidcError("invalid_token", "logout_token: must not carry a nonce")
        sub, sid = _text(claims.get("sub"), 255), _text(claims.get("sid"), 255)
        if not sub and not sid:
            raise OidcError("invalid_token", "logout_token: neither sub nor sid")
        jti = _text(claims.get("jti"), 255)
        if not jti:
            raise OidcError("invalid_token", "logout_token: no jti")
        if not self.redis.set(self._k("jti", hashlib.sha256(jti.encode()).hexdigest()), "1", nx=True,
                              ex=2 * (LOGOUT_TOKEN_MAX_AGE + self.s.clock_skew)):
            raise OidcError("replayed_token", "logout_token: this jti was already used")
        return sub, sid

    # -- the flow ------------------------------------------------------------------------------------
    def begin(self, next_target: str) -> tuple[str, str]:
        """Start a login: (the IdP's authorization URL, the browser-binding cookie value)."""
        doc = self.discovery()
        state, nonce, verifier, binding = (secrets.token_urlsafe(32) for _ in range(4))
        flow = {"nonce": nonce, "verifier": verifier, "next": next_target, "binding": binding_hash(binding)}
        self.redis.set(self._k("flow", state), orjson.dumps(flow), ex=self.s.flow_seconds)
        params = {"response_type": "code", "client_id": self.s.client_id, "redirect_uri": self.s.redirect_uri,
                  "scope": " ".join(self.s.scopes), "state": state, "nonce": nonce,
                  "code_challenge": pkce_challenge(verifier), "code_challenge_method": "S256"}
        if self.s.required_acr:
            params["acr_values"] = self.s.required_acr
        if doc.get("claims_parameter_supported"):  # ask for acr and amr in the id_token (some IdPs omit them)
            params["claims"] = orjson.dumps({"id_token": {"acr": None, "amr": None}}).decode()
        sep = "&" if "?" in doc["authorization_endpoint"] else "?"
        return doc["authorization_endpoint"] + sep + urlencode(params), binding

    def take_flow(self, state: str, binding: str | None) -> Flow:
        """The flow of ``state``, once (GETDEL); OidcError unknown/expired/used or another browser's."""
        if not isinstance(state, str) or not 16 <= len(state) <= 128:
            raise OidcError("wrong_state", "no or malformed state")
        raw = self.redis.getdel(self._k("flow", state))
        if raw is None:
            raise OidcError("wrong_state", "unknown, expired or already used state")
        data = orjson.loads(raw)
        if not binding or not secrets.compare_digest(binding_hash(binding).encode(), data["binding"].encode()):
            raise OidcError("wrong_state", "the login was started in another browser")
        return Flow(data["nonce"], data["verifier"], data["next"], data["binding"])

    def _client_auth(self, token_endpoint: str) -> tuple[dict, Any]:
        s = self.s
        if s.token_auth == "client_secret_post":
            return {"client_id": s.client_id, "client_secret": s.client_secret}, None
        if s.token_auth == "private_key_jwt":
            key = _private_key(s.private_key_pem)
            alg = "ES256" if key.key_type == "EC" else "RS256"
            now = int(self.clock())
            assertion = jwt.encode({"alg": alg, **({"kid": key.kid} if key.kid else {})},
                                   {"iss": s.client_id, "sub": s.client_id, "aud": token_endpoint,
                                    "jti": secrets.token_urlsafe(16), "iat": now, "exp": now + 60}, key,
                                   algorithms=[alg])
            return {"client_id": s.client_id, "client_assertion": assertion,
                    "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"}, None
        return {}, (s.client_id, s.client_secret)  # client_secret_basic (httpx URL-encodes nothing: ids are plain)

    def finish(self, flow: Flow, code: str) -> Identity:
        """Exchange the code (PKCE verifier), verify the id_token, read userinfo: the identity."""
        if not isinstance(code, str) or not 1 <= len(code) <= 2048:
            raise OidcError("invalid_request", "no authorization code")
        doc = self.discovery()
        extra, auth = self._client_auth(doc["token_endpoint"])
        form = {"grant_type": "authorization_code", "code": code, "redirect_uri": self.s.redirect_uri,
                "code_verifier": flow.verifier, **extra}
        try:
            r = self.http.post(doc["token_endpoint"], data=form, auth=auth, timeout=self.s.http_timeout,
                               headers={"Accept": "application/json"})
        except httpx.HTTPError as exc:
            raise OidcError("idp_unreachable", f"token endpoint: {type(exc).__name__}") from None
        try:
            tokens = r.json()
        except ValueError:
            tokens = {}
        if r.status_code != 200 or not isinstance(tokens, dict) or "id_token" not in tokens:
            err = tokens.get("error") if isinstance(tokens, dict) else None
            raise OidcError("token_refused", f"token endpoint: HTTP {r.status_code} {err or ''}".strip())
        id_token = tokens["id_token"]
        claims = self.verify_id_token(id_token, flow.nonce)
        if self.s.userinfo and doc.get("userinfo_endpoint") and isinstance(tokens.get("access_token"), str):
            info = self._get_json(doc["userinfo_endpoint"], "userinfo",
                                  headers={"Authorization": f"Bearer {tokens['access_token']}",
                                           "Accept": "application/json"})
            if info.get("sub") != claims["sub"]:
                raise OidcError("invalid_token", "userinfo: sub differs from the id_token's")
            claims = {**info, **claims}  # the signed id_token wins over userinfo
        return self.identity(claims, id_token)

    def identity(self, claims: Mapping[str, Any], id_token: str) -> Identity:
        """The identity a set of verified claims describes (login, RPPS, exercises, second factor)."""
        s = self.s
        acr = _text(claims.get("acr"), 128)
        amr_raw = claims.get("amr")
        amr = tuple(_text(a) for a in amr_raw if _text(a)) if isinstance(amr_raw, list) else ()
        if s.required_acr and acr != s.required_acr:
            raise OidcError("acr_too_low", f"acr {acr or '(none)'!r}, required {s.required_acr!r}")
        login = _text(claims.get(s.login_claim), 64).lower()
        if not login:
            raise OidcError("no_login", f"the IdP gave no {s.login_claim!r} claim")
        exercises = psc_exercises(claims) if s.profile == "psc" else ()
        rpps = psc_rpps(claims) if s.profile == "psc" else ""
        if s.profile == "psc" and not rpps:
            raise OidcError("no_rpps", "no RPPS number in SubjectNameID / preferred_username")
        second = bool((acr and acr in s.mfa_acr) or (set(amr) & set(s.mfa_amr)))
        name = _text(claims.get(s.name_claim), 128) or " ".join(
            p for p in (_text(claims.get("given_name")), _text(claims.get("family_name"))) if p)
        return Identity(login=login, display_name=name, sub=_text(claims.get("sub"), 255),
                        sid=_text(claims.get("sid"), 255), claims=dict(claims), exercises=exercises, rpps=rpps,
                        acr=acr, amr=amr, id_token=id_token, second_factor=second)

    # -- identities waiting for a dpiguard TOTP code --------------------------------------------------
    def keep_pending(self, data: dict) -> str:
        pending_id = secrets.token_urlsafe(32)
        self.redis.set(self._k("pending", pending_id), orjson.dumps(data), ex=self.s.flow_seconds)
        return pending_id

    def pending(self, pending_id: str) -> dict | None:
        if not isinstance(pending_id, str) or not 16 <= len(pending_id) <= 128:
            return None
        raw = self.redis.get(self._k("pending", pending_id))
        return orjson.loads(raw) if raw is not None else None

    def drop_pending(self, pending_id: str) -> bool:
        return bool(self.redis.delete(self._k("pending", pending_id)))

    # -- dpiguard sessions of IdP sessions -----------------------------------------------------------
    def link_session(self, sid_hash: str, sub: str, sid: str, id_token: str, ttl: int) -> None:
        pipe = self.redis.pipeline(transaction=False)
        key = self._k("session", sid_hash)
        pipe.hset(key, mapping={"sub": sub, "sid": sid, "id_token": id_token})
        pipe.expire(key, ttl)
        for kind, value in (("sid", sid), ("sub", sub)):
            if value:
                index = self._k(kind, hashlib.sha256(value.encode()).hexdigest())
                pipe.sadd(index, sid_hash)
                pipe.expire(index, ttl)
        pipe.execute()

    def session_link(self, sid_hash: str) -> dict[str, str]:
        return {as_text(k): as_text(v) for k, v in self.redis.hgetall(self._k("session", sid_hash)).items()}

    def sessions_of(self, sub: str, sid: str) -> set[str]:
        """The dpiguard session hashes of an IdP session (``sid``) or, without one, of a subject."""
        kind, value = ("sid", sid) if sid else ("sub", sub)
        hashes = {as_text(h) for h in self.redis.smembers(self._k(kind, hashlib.sha256(value.encode()).hexdigest()))}
        if sid and sub:  # both given: only sessions of that subject
            hashes = {h for h in hashes if self.session_link(h).get("sub") == sub}
        return hashes

    def unlink_session(self, sid_hash: str) -> None:
        self.redis.delete(self._k("session", sid_hash))

    def end_session_url(self, id_token: str) -> str | None:
        """RP-initiated logout at the IdP (``end_session_endpoint``), or None if it has none."""
        try:
            endpoint = self.discovery().get("end_session_endpoint")
        except OidcError:
            return None
        if not isinstance(endpoint, str) or not endpoint.startswith(("https://", "http://")):
            return None
        params = {"client_id": self.s.client_id}
        if id_token:
            params["id_token_hint"] = id_token
        if self.s.post_logout_redirect_uri:
            params["post_logout_redirect_uri"] = self.s.post_logout_redirect_uri
            params["state"] = secrets.token_urlsafe(16)
        return endpoint + ("&" if "?" in endpoint else "?") + urlencode(params)
