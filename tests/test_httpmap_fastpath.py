"""normalize_path's fast path for plain paths gives exactly what the full check gives."""

from __future__ import annotations

import random

import pytest

from dpiguard.policy.paths import HostileRequest, _normalize_path_full, normalize_path

EDGES = ["/", "/patients", "/patients/", "/patients/P0001/biology", "/fhir/Observation", "/a.b/c-d_e",
         "/static/app.v2.css", "/x/", "/.well-known/x", "/a/./b", "/a/../b", "/a/...", "/a//b", "//",
         "/a/%41", "/a/%2F", "/a;b", "/a\\b", "/ａ", "/a/b/" + "c" * 3000, "/a/..;/b", "/P1/", "/-/_"]


def outcome(fn, path):
    try:
        return fn(path)
    except HostileRequest as exc:
        return ("refused", exc.reason)


@pytest.mark.parametrize("path", EDGES)
def test_fast_path_agrees_on_edge_cases(path):
    assert outcome(normalize_path, path) == outcome(_normalize_path_full, path)


def test_fast_path_agrees_on_random_paths():
    rng = random.Random(5)
    alphabet = "aZ09._-/~%;\\2F.."
    for _ in range(5000):
        path = "/" + "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 12)))
        assert outcome(normalize_path, path) == outcome(_normalize_path_full, path), path
