"""Values across the sandbox's boundary: plain JSON by exact type, written by either side and read by the other.

Plain data crosses by exact type: None, bool, int, float, complex, str, bytes, list, tuple, dict, set, frozenset,
slice, the builtin classes themselves (`int`), Counter, OrderedDict, defaultdict and deque of those, and numeric numpy arrays (numpy scalars become Python
numbers). Anything else (a subclass, an object with its own __eq__, a generator, a class) is not data: the sandbox
keeps it and sends a handle in its place (`{"handle": [number, type name]}`), which the judge can only send back
(`{"ref": number}`) or act on through requests; the judge's objects never cross.

This file is the single source for both sides: the judge imports it with the package, and the harness, run as a
script inside the sandbox, imports it from a second bind-mounted file; so it needs nothing beyond the standard library
(numpy only where arrays already exist).
"""

from __future__ import annotations

import builtins
import collections
import importlib
import json
import math
import re
import sys
import time
from collections.abc import Callable

_SEQUENCES = {kind.__name__: kind for kind in (tuple, set, frozenset, collections.deque)}
_MAPPINGS: dict[str, Callable] = {"dict": dict, "OrderedDict": collections.OrderedDict}
_MAPPINGS["Counter"] = lambda pairs: collections.Counter(dict(pairs))  # Counter(pairs) would count them
_MAPPINGS["defaultdict"] = lambda pairs: collections.defaultdict(None, pairs)
_SEQUENCE_TYPES = tuple(_SEQUENCES.values())
_HASHED = {"set", "frozenset"}
_MAPPING_TYPES = (dict, collections.Counter, collections.OrderedDict, collections.defaultdict)
_TYPES_BY_NAME = {name: kind for name, kind in vars(builtins).items() if type(kind) is type}  # int, str, ValueError
_BUILTIN_TYPES = {kind: name for name, kind in _TYPES_BY_NAME.items()}
_NUMERIC_DTYPE = re.compile(r"[<>|=]?[biufc]\d{1,2}")  # numpy's dtype.str of bool, integer, float and complex arrays


def _encode(value: object, other: Callable[[object], dict]) -> object:
    """`value` as JSON-ready data, by exact type; `other(item)` gives the tag of anything that is not data (or
    raises TypeError)."""
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
        if kind is type and item in _BUILTIN_TYPES:  # MBPP 533 passes `int` to the program
            return {"type": _BUILTIN_TYPES[item]}
        if kind is slice:
            return {"slice": [walk(item.start), walk(item.stop), walk(item.step)]}
        if numpy is not None and isinstance(item, numpy.generic):
            return walk(item.item())  # numpy's scalars stand for Python numbers; item() gives the exact type
        if numpy is not None and kind is numpy.ndarray and _NUMERIC_DTYPE.fullmatch(item.dtype.str):
            return {"ndarray": [item.dtype.str, list(item.shape), walk(item.ravel().tolist())]}
        return other(item)

    return walk(value)


def _decode(
    text: str | bytes, deadline: float = math.inf, other: Callable[[str, object], object] | None = None
) -> object:
    """Parse JSON written by _encode into this side's own types, by `deadline` (time.monotonic(); else TimeoutError);
    `other(tag, body)` reads the tags of what is not data, where this side accepts them; ValueError or TypeError for
    anything else. Bounded: the text is at most a run's 16 MiB of answers, JSON's parser is linear, and no set or
    dict is built whose hash table would take quadratic time."""

    def untag(item: dict) -> object:
        if time.monotonic() > deadline:
            raise TimeoutError
        return _untag(item, other)

    return json.loads(text, object_hook=untag)  # lists stay lists; every JSON object must be a tag


# Distinct elements of one set (keys of one dict) with one hash: a few occur in real data (hash(-1) == hash(-2)); many
# make the table quadratic to build: 8k integers k * (2**61 - 1) took 0.41 s, 16 MiB of them about half an hour.
_MAX_SHARED_HASH = 16


def _hashed(elements: list) -> list:
    """`elements`, unless too many share one hash for a set or dict of them to be built in linear time."""
    shared = collections.Counter(map(hash, elements)).most_common(1)  # a dict of hashes, equal or far apart: linear
    if shared and shared[0][1] > _MAX_SHARED_HASH:
        raise ValueError(
            f"{shared[0][1]} elements of one set or dict share a hash: building it would take quadratic time"
        )
    return elements


def _untag(item: dict, other: Callable[[str, object], object] | None) -> object:
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
    if tag == "type" and body in _TYPES_BY_NAME:
        return _TYPES_BY_NAME[body]
    if tag == "slice" and type(body) is list and len(body) == 3:
        return slice(*body)
    if tag == "ndarray" and type(body) is list and len(body) == 3 and _NUMERIC_DTYPE.fullmatch(str(body[0])):
        numpy = importlib.import_module("numpy")
        return numpy.array(body[2], dtype=numpy.dtype(body[0])).reshape([int(size) for size in body[1]])
    if other is not None:
        return other(tag, body)
    raise ValueError(f"unknown tag {tag!r}")
