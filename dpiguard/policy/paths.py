"""Request targets made canonical, or refused: path normalisation and query parsing.

Strict and fail-closed (pipeline step 2, see docs/architecture.md):

* ``normalize_path`` turns the raw path into one canonical form, or refuses it
  (``HostileRequest('hostile_path')``) when it contains anything a back end could read differently
  from us: dot segments, encoded slashes, backslashes, control characters, double encoding...
  We never try to "repair" such a path.
* ``parse_query`` decodes the query string with size limits.
"""

from __future__ import annotations

import re
import unicodedata

MAX_PATH_BYTES = 2048
MAX_QUERY_BYTES = 4096
MAX_QUERY_PARAMS = 100

_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
# Characters allowed raw in a path: RFC 3986 pchar + "/" + "%", minus ";" (servlet containers read
# "..;/" as ".." - a classic bypass), so no other character may appear unencoded.
_RAW_PATH_CHARS = _UNRESERVED | frozenset("!$&'()*+,=:@/%")
_HEX = frozenset("0123456789abcdefABCDEF")
# Bytes refused even when percent-encoded: "/" and "\" (segment confusion), ";" (see above).
_FORBIDDEN_ENCODED = {0x2F: "encoded slash", 0x5C: "encoded backslash", 0x3B: "encoded semicolon"}


class HostileRequest(Exception):
    """The request is refused before any routing; ``reason`` is a refusal reason of the pipeline."""

    REASONS = ("hostile_path", "ambiguous_patient")

    def __init__(self, reason: str, message: str):
        if reason not in self.REASONS:
            raise ValueError(f"unknown refusal reason {reason!r}")
        self.reason = reason
        self.message = message
        super().__init__(message)


def _hostile(message: str) -> HostileRequest:
    return HostileRequest("hostile_path", message)


# -- path normalization ----------------------------------------------------------------------------
def _decode_segment(raw: str) -> tuple[str, str]:
    """Return (canonical, fully decoded) forms of one raw segment, or raise HostileRequest.

    The canonical form decodes unreserved characters and upper-cases the remaining escapes.
    """
    canonical: list[str] = []
    decoded = bytearray()
    i = 0
    while i < len(raw):
        char = raw[i]
        if char != "%":
            canonical.append(char)
            decoded.append(ord(char))
            i += 1
            continue
        pair = raw[i + 1:i + 3]
        if len(pair) != 2 or not set(pair) <= _HEX:
            raise _hostile("invalid percent-encoding in path")
        byte = int(pair, 16)
        if byte == 0x25 and len(raw) >= i + 5 and set(raw[i + 3:i + 5]) <= _HEX:
            raise _hostile("double percent-encoding in path")
        if byte < 0x20 or byte == 0x7F:
            raise _hostile("encoded control character in path")
        if byte in _FORBIDDEN_ENCODED:
            raise _hostile(f"{_FORBIDDEN_ENCODED[byte]} in path")
        canonical.append(chr(byte) if chr(byte) in _UNRESERVED else f"%{byte:02X}")
        decoded.append(byte)
        i += 3
    try:
        text = decoded.decode("utf-8")
    except UnicodeDecodeError:
        raise _hostile("path is not valid UTF-8 once decoded") from None
    return "".join(canonical), text


def _check_decoded_segment(text: str) -> None:
    if text.strip(".") == "":
        raise _hostile("dot segment in path")
    for char in text:
        if unicodedata.category(char) in ("Cc", "Cf"):
            raise _hostile("control or invisible character in path")
    folded = unicodedata.normalize("NFKC", text)
    if folded != text and any(c in folded for c in "./\\;%"):
        raise _hostile("look-alike of '.', '/', '\\', ';' or '%' in path")


# Paths made only of segments of unreserved ASCII characters that do not start with "." (so no dot
# segment, nothing to decode or fold): their canonical form is themselves, minus one trailing "/".
# Nearly every real request is one; anything else takes the full check below.
_PLAIN_PATH = re.compile(r"(?:/[A-Za-z0-9_-][A-Za-z0-9._-]*)+/?")


def normalize_path(raw: str) -> str:
    """Canonical form of a request path (without query), or HostileRequest('hostile_path').

    The result starts with "/", has no trailing "/" (except "/" itself), no empty or dot segment,
    and unreserved characters percent-decoded (``%41`` -> ``A``); other escapes are kept, upper-cased.
    """
    if len(raw) <= MAX_PATH_BYTES and _PLAIN_PATH.fullmatch(raw):
        return raw[:-1] if raw.endswith("/") else raw
    return _normalize_path_full(raw)


def _normalize_path_full(raw: str) -> str:
    if not raw.startswith("/"):
        raise _hostile("path must start with '/'")
    if len(raw.encode("utf-8", "surrogatepass")) > MAX_PATH_BYTES:
        raise _hostile("path too long")
    for char in raw:
        if char not in _RAW_PATH_CHARS:
            if char == "\\":
                raise _hostile("backslash in path")
            if ord(char) < 0x20 or ord(char) == 0x7F:
                raise _hostile("control character in path")
            raise _hostile(f"character {char!r} not allowed unencoded in path")
    if raw == "/":
        return "/"
    segments = raw[1:].split("/")
    if segments[-1] == "":
        segments.pop()  # one trailing slash is dropped: /patients/P1/ == /patients/P1
    canonical: list[str] = []
    for segment in segments:
        if segment == "":
            raise _hostile("empty path segment ('//')")
        canon, text = _decode_segment(segment)
        _check_decoded_segment(text)
        canonical.append(canon)
    return "/" + "/".join(canonical)


# -- query -----------------------------------------------------------------------------------------
def _decode_query_part(raw: str) -> str:
    if "%" not in raw and "+" not in raw and raw.isascii() and raw.isprintable():
        return raw  # nothing to decode, no control character: what the loop below would return
    data = bytearray()
    i = 0
    while i < len(raw):
        char = raw[i]
        if char == "%":
            pair = raw[i + 1:i + 3]
            if len(pair) != 2 or not set(pair) <= _HEX:
                raise _hostile("invalid percent-encoding in query")
            data.append(int(pair, 16))
            i += 3
            continue
        if ord(char) > 0x7E:
            raise _hostile("non-ASCII character not encoded in query")
        data.extend(b" " if char == "+" else char.encode("ascii"))
        i += 1
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise _hostile("query is not valid UTF-8 once decoded") from None
    if any(unicodedata.category(c) == "Cc" for c in text):
        raise _hostile("control character in query")
    return text


def parse_query(raw_query: str) -> dict[str, list[str]]:
    """Decode ``a=1&b=2&a=3`` into ``{"a": ["1", "3"], "b": ["2"]}`` (``+`` is a space).

    Refused (``hostile_path``) beyond 4096 bytes or 100 parameters, or on bad encoding.
    """
    if len(raw_query.encode("utf-8", "surrogatepass")) > MAX_QUERY_BYTES:
        raise _hostile("query string too long")
    result: dict[str, list[str]] = {}
    pieces = [piece for piece in raw_query.split("&") if piece]
    if len(pieces) > MAX_QUERY_PARAMS:
        raise _hostile("too many query parameters")
    for piece in pieces:
        raw_name, _, raw_value = piece.partition("=")
        result.setdefault(_decode_query_part(raw_name), []).append(_decode_query_part(raw_value))
    return result
