"""Values across the sandbox's boundary: plain JSON by exact type, written by the harness and read by the judge.

Values leave the sandbox as plain data, by exact type: None, bool, int, float, complex, str, bytes, list, tuple, dict,
set, frozenset and Counter, OrderedDict, defaultdict and deque of those (numpy scalars become Python numbers).
Anything else (a subclass, an object with its own __eq__, a generator, a match object) reaches the judge as an opaque
placeholder that equals only itself. The judge also encodes the data arguments of the calls it sends (strict: what is
not plain data stays in the sandbox as source).

This file is the single source for both sides: the judge imports it with the package, and the harness, run as a
script inside the sandbox, imports it from a second bind-mounted file; so it needs nothing beyond the standard library.
"""

from __future__ import annotations

import collections
import json
import math
import sys
import time
from collections.abc import Callable


class _Opaque:
    """A returned value that is not plain data: the judge knows only its type's name, and it equals only itself."""

    def __init__(self, type_name: str) -> None:
        self.type_name = type_name

    def __repr__(self) -> str:
        return f"<{self.type_name} object>"


_SEQUENCES = {kind.__name__: kind for kind in (tuple, set, frozenset, collections.deque)}
_MAPPINGS: dict[str, Callable] = {"dict": dict, "OrderedDict": collections.OrderedDict}
_MAPPINGS["Counter"] = lambda pairs: collections.Counter(dict(pairs))  # Counter(pairs) would count them
_MAPPINGS["defaultdict"] = lambda pairs: collections.defaultdict(None, pairs)
_SEQUENCE_TYPES = tuple(_SEQUENCES.values())
_HASHED = {"set", "frozenset"}
_MAPPING_TYPES = (dict, collections.Counter, collections.OrderedDict, collections.defaultdict)


def _encode(value: object, strict: bool = False) -> object:
    """`value` as JSON-ready data, by exact type; anything else becomes an opaque marker, or a TypeError if `strict`."""
    numpy = sys.modules.get("numpy")

    def walk(item: object) -> object:  # recursion through a closure: patching this module cannot redirect it
        kind = type(item)
        if item is None or kind is bool or kind is str or kind is float:
            return item
        if kind is int:
            return item if -(1 << 63) < item < 1 << 63 else {"int": hex(item)}  # JSON readers differ on big ints
        if kind is list:
            return [walk(element) for element in item]
        if kind in _SEQUENCE_TYPES:
            return {kind.__name__: [walk(element) for element in item]}
        if kind in _MAPPING_TYPES:
            return {kind.__name__: [[walk(key), walk(element)] for key, element in item.items()]}
        if kind is bytes:
            return {"bytes": item.hex()}
        if kind is complex:
            return {"complex": [item.real, item.imag]}
        if numpy is not None and isinstance(item, numpy.generic):
            return walk(item.item())  # numpy's scalars stand for Python numbers; item() gives the exact type
        if strict:
            raise TypeError(f"{kind.__name__} is not plain data")
        return {"opaque": kind.__qualname__}

    return walk(value)


def _decode(text: str | bytes, deadline: float = math.inf) -> object:
    """Parse JSON written by _encode into the judge's own types, by `deadline` (time.monotonic(); else TimeoutError);
    ValueError or TypeError for anything else. Bounded: the text is at most the run's 16 MiB of records, JSON's
    parser is linear, and no set or dict is built whose hash table would take quadratic time."""

    def untag(item: dict) -> object:
        if time.monotonic() > deadline:
            raise TimeoutError
        return _untag(item)

    return json.loads(text, object_hook=untag)  # lists stay lists; every JSON object must be a tag


# Distinct elements of one set (keys of one dict) with one hash: a few occur in real data (hash(-1) == hash(-2)); many
# make the table quadratic to build: 8k integers k * (2**61 - 1) took 0.41 s, 16 MiB of them about half an hour.
_MAX_SHARED_HASH = 16


def _hashed(elements: list) -> list:
    """`elements`, unless too many share one hash for a set or dict of them to be built in linear time."""
    shared = collections.Counter(map(hash, elements)).most_common(1)  # a dict of hashes, equal or far apart: linear
    if shared and shared[0][1] > _MAX_SHARED_HASH:
        raise ValueError(f"{shared[0][1]} elements of one set or dict share a hash: building it would take quadratic time")
    return elements


def _untag(item: dict) -> object:
    if len(item) != 1:
        raise ValueError("not encoded data")
    ((tag, body),) = item.items()
    if tag in _SEQUENCES and type(body) is list:
        return _SEQUENCES[tag](_hashed(body) if tag in _HASHED else body)
    if tag in _MAPPINGS and type(body) is list:
        _hashed([pair[0] for pair in body if type(pair) is list and pair])
        return _MAPPINGS[tag](body)
    if tag == "int" and type(body) is str:
        return int(body, 16)
    if tag == "bytes" and type(body) is str:
        return bytes.fromhex(body)
    if tag == "complex" and type(body) is list:
        return complex(*map(float, body))
    if tag == "opaque" and type(body) is str:
        return _Opaque(body)
    raise ValueError(f"unknown tag {tag!r}")
