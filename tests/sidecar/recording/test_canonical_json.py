"""canonical_json with orjson (issue 16): byte-identical to the standard library's canonical form.

The reference is the encoder that defined the recording's canonical form until now (sorted
keys, no spaces, UTF-8, NaN refused): for every generated value - unicode in keys and values
(every code point, control characters, lone surrogates), floats (exponents, -0.0, NaN,
infinities), ints beyond 64 bits, nesting, tuples - ``canonical_json`` must give the same bytes,
or refuse what the reference refuses. Values orjson would serialize and the standard library
refuses (datetimes, UUIDs, dataclasses, enums) must still be refused.
"""

from __future__ import annotations

import dataclasses
import datetime
import enum
import json
import uuid
from collections import OrderedDict

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chaperone_sidecar.recording import events
from chaperone_sidecar.recording.events import Chain, canonical_json, event_hash

REFERENCE = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def reference(value):
    """(bytes, None) or (None, exception class) as the standard library's canonical form gives it."""
    try:
        return REFERENCE.encode(value).encode("utf-8"), None
    except (TypeError, ValueError, UnicodeEncodeError, RecursionError) as exc:
        return None, type(exc)


def ours(value):
    try:
        return canonical_json(value), None
    except (TypeError, ValueError, UnicodeEncodeError, RecursionError) as exc:
        return None, type(exc)


def same(value) -> None:
    expected, ours_ = reference(value), ours(value)
    if expected[1] is None:
        assert ours_ == expected, value
    else:  # refused: the same kind of error as the reference (a seal turns it into ValueError)
        assert ours_[0] is None and issubclass(ours_[1], (TypeError, ValueError)) == issubclass(
            expected[1], (TypeError, ValueError)), (value, ours_, expected)


text = st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=0x10FFFF), max_size=40)
scalars = (st.none() | st.booleans() | text
           | st.integers(min_value=-(1 << 70), max_value=1 << 70)
           | st.integers(min_value=-(1 << 63) - 2, max_value=(1 << 64) + 2)
           | st.floats(allow_nan=True, allow_infinity=True)
           | st.sampled_from([0.0, -0.0, 1e16, 1e15, 1e-5, 1e-4, 123.456, 1.5e300, 5e-324, 1e22, 1e21]))
values = st.recursive(scalars, lambda children: (
    st.lists(children, max_size=5) | st.lists(children, max_size=4).map(tuple)
    | st.dictionaries(text, children, max_size=5)), max_leaves=40)


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(values)
def test_generated_values_encode_as_the_standard_library_does(value):
    same(value)
    same({"data": value, "type": "request", "seq": 3})


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(text, st.integers() | text, max_size=8))
def test_key_order_is_code_point_order(value):
    same(value)


def test_every_code_point_escapes_as_the_standard_library_does():
    for start in range(0, 0x110000, 0x800):
        chunk = "".join(chr(c) for c in range(start, start + 0x800) if not 0xD800 <= c <= 0xDFFF)
        if chunk:
            same({"s": chunk, chunk[:8]: 1})
    for c in list(range(0x20)) + [0x22, 0x5C, 0x7F, 0x2028, 0x2029, 0xFEFF, 0x10FFFF]:
        same({"s": f"a{chr(c)}b"})


@pytest.mark.parametrize("value", [
    {"x": float("nan")}, {"x": float("inf")}, [float("-inf")],  # refused
    {"big": 1 << 64}, {"big": -(1 << 63) - 1}, {"max": (1 << 64) - 1}, {"min": -(1 << 63)},
    {"lone": "\ud800"}, {"\udfff": 1},  # refused: not UTF-8
    {1: "int key"}, {"a": 1, 2: "mixed keys"}, {None: 1}, {True: 1}, {1.5: 1},
    {"t": (1, (2, [3]))}, [], {}, "", 0, -0.0, 1e16, True, None,
])
def test_edge_values(value):
    same(value)


class Colour(enum.Enum):
    RED = "red"


class Level(enum.IntEnum):
    HIGH = 3


class Name(str):
    pass


@dataclasses.dataclass
class Point:
    x: int


@pytest.mark.parametrize("value", [
    {"when": datetime.datetime(2026, 12, 5, tzinfo=datetime.UTC)}, {"day": datetime.date(2026, 12, 5)},
    {"id": uuid.UUID(int=1)}, {"point": Point(1)}, {"colour": Colour.RED},  # refused by both
    {"level": Level.HIGH}, {"name": Name("x")}, {Name("k"): 1},  # subclasses: the stdlib's form
    OrderedDict([("b", 1), ("a", 2)]), {"b": b"bytes"}, {"set": {1}},
])
def test_types_orjson_knows_and_the_standard_library_does_not(value):
    same(value)


def test_deep_and_circular_values_are_the_standard_librarys_business():
    deep: list = []
    for _ in range(300):  # deeper than orjson goes
        deep = [deep]
    same({"deep": deep})
    loop: dict = {}
    loop["self"] = loop
    same(loop)


def test_plain_values_take_orjson_and_others_the_standard_library():
    assert events._plain({"a": [1, "x", None, True, (2, {"b": "c"})]})
    assert not events._plain({"a": [1.0]})  # floats: the standard library's repr
    assert not events._plain({1: "a"})
    assert not events._plain({"a": Name("x")})


def test_sealed_line_is_the_canonical_form_of_the_event():
    chain = Chain("s1")
    event = {"type": "response", "time": "2026-12-05T08:00:00.000000Z", "flow": "f1",
             "data": {"body": {"text": '{"k": "vé\\u2028\x01"}', "size": 9}, "status": 200, "ratio": 0.5,
                      "headers": [["content-type", "application/json"]], "masked": {}, "big": 1 << 65}}
    sealed, line = chain.seal(event)
    whole = {k: v for k, v in sealed.items() if k != "hash"}
    assert sealed["hash"] == events.sha256_hex(REFERENCE.encode(whole).encode()) == event_hash(sealed)
    assert line == REFERENCE.encode(sealed).encode() + b"\n"
    with pytest.raises(ValueError):
        chain.seal({"type": "request", "data": {"x": float("nan")}})
    assert chain.seq == 1  # the refused event left the chain as it was
