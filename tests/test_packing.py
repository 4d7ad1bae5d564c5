"""dpiguard.decision.packing: facts kept as one bytes object come back exactly as they were read."""

import gc
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dpiguard.decision.access import AccessFacts
from dpiguard.decision.packing import pack, unpack

scalar = st.one_of(st.none(), st.binary(max_size=300), st.text(max_size=80))
redis_value = st.one_of(st.binary(max_size=300), st.text(max_size=80))
value = st.one_of(scalar, st.dictionaries(redis_value, redis_value, max_size=12),
                  st.tuples() | st.lists(scalar, max_size=6).map(tuple))
read_at = st.floats(allow_nan=False)


@settings(max_examples=400, deadline=None)
@given(read_at, st.lists(value, max_size=8))
def test_round_trip_is_exact(when, values):
    when2, back = unpack(pack(when, values))
    assert when2 == when or (math.isnan(when) and math.isnan(when2))
    assert back == list(values)
    for a, b in zip(back, values):  # bytes stay bytes, str stay str, dicts keep their order
        assert type(a) is type(b)
        if type(b) is dict:
            assert list(a.items()) == list(b.items())
            assert all(type(x) is type(y) for x, y in zip([*a, *a.values()], [*b, *b.values()]))


@settings(max_examples=200, deadline=None)
@given(read_at, st.lists(value, min_size=1, max_size=6), st.data())
def test_truncated_buffers_raise(when, values, data):
    blob = pack(when, values)
    cut = data.draw(st.integers(0, len(blob) - 1))
    try:
        _, back = unpack(blob[:cut])
    except ValueError:
        return
    # a cut on an item boundary reads fewer items: never the same list (AccessFacts checks the count)
    assert back != list(values)


def test_lengths_at_every_width():
    for n in (0, 29, 30, 31, 255, 256, 70_000):
        _, back = unpack(pack(1.0, [b"x" * n, "é" * n, {b"k" * n: b"v"}]))
        assert back == [b"x" * n, "é" * n, {b"k" * n: b"v"}]


def test_other_types_are_refused():
    with pytest.raises(TypeError):
        pack(1.0, [3])
    with pytest.raises(TypeError):
        pack(1.0, [{b"a": 1}])
    with pytest.raises(ValueError):
        unpack(b"")
    with pytest.raises(ValueError):
        unpack(pack(1.0, []) + bytes([7 << 5]))  # unknown tag


def test_facts_round_trip_and_stay_out_of_the_collector():
    facts = AccessFacts(1733300000.25, {b"CARDIO": b"1733200000|"},
                        {b"S0123456789abcdef": b'{"unit":"CARDIO","start":1733200000,"end":null}'},
                        b'{"kind":"referent","start":null,"end":null}', {}, None, ("same_family_name",))
    packed = facts.packed()
    assert type(packed) is bytes and not gc.is_tracked(packed)
    assert AccessFacts.unpacked(packed) == facts
    assert AccessFacts.unpacked(facts._replace(privacy_matches=None).packed()).privacy_matches is None
    with pytest.raises(ValueError):
        AccessFacts.unpacked(pack(1.0, [{}, {}]))
