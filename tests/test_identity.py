"""Signed identity assertions and identity-header classification."""

from __future__ import annotations

import base64
import os
import stat

import orjson
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from dpiguard.decision.assertion import (
    HEADER_ASSERTION,
    HEADER_USER,
    AssertionSigner,
    AssertionVerifier,
    InvalidAssertion,
    is_identity_header,
)
from dpiguard.signing import generate_keypair

AUDIENCE = "http://dpi.example:8080"
NOW = 1_800_000_000


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@pytest.fixture
def key():
    return Ed25519PrivateKey.generate()


@pytest.fixture
def signer(key):
    return AssertionSigner(key, AUDIENCE, ttl=60)


@pytest.fixture
def verifier(key):
    return AssertionVerifier(key.public_key(), AUDIENCE)


def issue(signer, now=NOW):
    return signer.sign("dr.martin", ["doctor"], ["CARDIO"], "ab" * 32, now=now)


def test_round_trip(signer, verifier):
    token = issue(signer)
    claims = verifier.verify(token, now=NOW + 1)
    assert claims["sub"] == "dr.martin"
    assert claims["roles"] == ["doctor"]
    assert claims["units"] == ["CARDIO"]
    assert claims["iss"] == "dpiguard"
    assert claims["aud"] == AUDIENCE
    assert claims["exp"] - claims["iat"] == 60
    assert claims["sid"] == ("ab" * 32)[:16]
    assert claims["jti"]
    header = orjson.loads(unb64(token.split(".")[0]))
    assert header["alg"] == "EdDSA" and header["typ"] == "JWT" and header["kid"] == signer.kid


def test_tampered_payload_is_rejected(signer, verifier):
    header, payload, signature = issue(signer).split(".")
    claims = orjson.loads(unb64(payload))
    claims["roles"] = ["doctor", "pharmacist"]
    forged = f"{header}.{b64(orjson.dumps(claims))}.{signature}"
    with pytest.raises(InvalidAssertion, match="signature"):
        verifier.verify(forged, now=NOW)


def test_tampered_signature_is_rejected(signer, verifier):
    header, payload, signature = issue(signer).split(".")
    raw = bytearray(unb64(signature))
    raw[0] ^= 0x01
    with pytest.raises(InvalidAssertion, match="signature"):
        verifier.verify(f"{header}.{payload}.{b64(bytes(raw))}", now=NOW)


@pytest.mark.parametrize("alg", ["none", "HS256", "RS256", "ES256", None])
def test_other_algorithms_are_rejected(signer, verifier, alg):
    _, payload, signature = issue(signer).split(".")
    header = b64(orjson.dumps({"alg": alg, "typ": "JWT"}))
    for sig in (signature, ""):
        with pytest.raises(InvalidAssertion):
            verifier.verify(f"{header}.{payload}.{sig}", now=NOW)


def test_alg_none_reports_algorithm(signer, verifier):
    _, payload, _ = issue(signer).split(".")
    header = b64(orjson.dumps({"alg": "none", "typ": "JWT"}))
    with pytest.raises(InvalidAssertion, match="algorithm"):
        verifier.verify(f"{header}.{payload}.{b64(b'x')}", now=NOW)


def test_wrong_key_is_rejected(signer):
    other = AssertionVerifier(Ed25519PrivateKey.generate().public_key(), AUDIENCE)
    with pytest.raises(InvalidAssertion, match="signature"):
        other.verify(issue(signer), now=NOW)


def test_expired_and_not_yet_valid(signer, verifier):
    token = issue(signer)
    verifier.verify(token, now=NOW + 60 + 4)  # within the 5 s leeway
    with pytest.raises(InvalidAssertion, match="expired"):
        verifier.verify(token, now=NOW + 60 + 5)
    with pytest.raises(InvalidAssertion, match="not yet valid"):
        verifier.verify(token, now=NOW - 30)


def test_wrong_audience(key, signer):
    other = AssertionVerifier(key.public_key(), "http://other-upstream")
    with pytest.raises(InvalidAssertion, match="audience"):
        other.verify(issue(signer), now=NOW)


def test_wrong_issuer(key, verifier):
    header = b64(orjson.dumps({"alg": "EdDSA", "typ": "JWT"}))
    claims = {"iss": "someone-else", "sub": "x", "aud": AUDIENCE, "iat": NOW, "exp": NOW + 60}
    signing_input = f"{header}.{b64(orjson.dumps(claims))}"
    token = f"{signing_input}.{b64(key.sign(signing_input.encode()))}"
    with pytest.raises(InvalidAssertion, match="issuer"):
        verifier.verify(token, now=NOW)


@pytest.mark.parametrize(
    "token",
    ["", "abc", "a.b", "a.b.c.d", "!!!.???.***", "eyJhbGciOiJFZERTQSJ9.e30=.AAAA", "a" * 9000],
)
def test_malformed(verifier, token):
    with pytest.raises(InvalidAssertion):
        verifier.verify(token, now=NOW)


def test_signer_reuses_token_until_half_ttl(signer, verifier):
    first = issue(signer, now=NOW)
    assert issue(signer, now=NOW + 29) == first
    renewed = issue(signer, now=NOW + 30)
    assert renewed != first
    assert verifier.verify(renewed, now=NOW + 30)["iat"] == NOW + 30
    other_identity = signer.sign("dr.martin", ["doctor"], ["PNEUMO"], "ab" * 32, now=NOW + 30)
    assert other_identity != renewed
    other_session = signer.sign("dr.martin", ["doctor"], ["CARDIO"], "cd" * 32, now=NOW + 30)
    assert other_session != renewed


def test_keypair_files(tmp_path):
    private_path, public_path = tmp_path / "dpiguard.key", tmp_path / "dpiguard.pub"
    generate_keypair(private_path, public_path)
    assert stat.S_IMODE(os.stat(private_path).st_mode) == 0o600
    signer = AssertionSigner.from_pem_file(private_path, AUDIENCE)
    verifier = AssertionVerifier.from_pem_file(public_path, AUDIENCE)
    assert verifier.verify(signer.sign("u", [], [], "s"))["sub"] == "u"
    with pytest.raises(FileExistsError):
        generate_keypair(private_path, tmp_path / "other.pub")
    with pytest.raises(FileExistsError):
        generate_keypair(tmp_path / "other.key", public_path)


def test_header_classification():
    assert is_identity_header(HEADER_USER)
    assert is_identity_header(HEADER_ASSERTION.upper())
    assert is_identity_header("x-dpiguard-anything-new")
    assert is_identity_header("X-Remote-User")
    assert is_identity_header("Remote-User")
    assert is_identity_header("X-Forwarded-Email")
    assert not is_identity_header("X-Forwarded-For")
    assert not is_identity_header("Authorization")
    assert not is_identity_header("X-Employee")
    assert is_identity_header("X-Employee", extra=["x-employee"])
    assert is_identity_header("x-employee", extra=["X-Employee"])
