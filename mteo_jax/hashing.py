"""Content hashes that name cached artefacts: a teacher by its parameters, a configuration by its canonical JSON.

``hash_pytree`` = sha256 over (key path, dtype, shape, raw bytes) of every leaf, leaves sorted by key path, so two
parameter trees hash equal exactly when they hold the same arrays under the same names. ``hash_json`` = sha256 of the
canonical JSON (sorted keys, exact float repr) of dataclasses, dicts, lists, numbers and small arrays.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from typing import Any

import jax
import numpy as np

# Arrays up to this many elements are written into JSON value by value (readable, exact); larger ones by content hash.
_MAX_INLINE_ARRAY_SIZE = 4096


def _leaf_to_numpy(leaf: Any) -> tuple[str, np.ndarray]:
  """``(dtype name, little-endian C-contiguous array)`` of one leaf; typed PRNG keys are hashed by their key data."""
  if isinstance(leaf, jax.Array) and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
    return f"key<{jax.random.key_impl(leaf)}>", np.ascontiguousarray(jax.random.key_data(leaf))
  array = np.asarray(leaf)
  if array.dtype == object:
    raise TypeError(f"hash_pytree: cannot hash a leaf of type {type(leaf).__name__} (object array); expected "
                    "numeric arrays, numpy/Python scalars or strings")
  if array.dtype.byteorder == ">":
    # Same values, same hash, whatever the machine's byte order.
    array = array.astype(array.dtype.newbyteorder("<"))
  return array.dtype.name, np.ascontiguousarray(array)


def _update_framed(digest: "hashlib._Hash", data: bytes) -> None:
  """Length-prefixed update, so that field boundaries can never be shifted into a collision."""
  digest.update(len(data).to_bytes(8, "little"))
  digest.update(data)


def hash_pytree(tree: Any) -> str:
  """sha256 hex digest over the sorted ``(key path, dtype, shape, bytes)`` of every leaf of ``tree``.

  Works for Flax parameter dicts (``dict`` or ``FrozenDict``), lists/tuples, NamedTuples and bare numpy/jax arrays.
  A container is identified by its keys, not its Python type: ``{"w": a}`` and ``FrozenDict({"w": a})`` hash equal.
  """
  leaves_with_paths, _ = jax.tree_util.tree_flatten_with_path(tree)
  entries = sorted((jax.tree_util.keystr(path), leaf) for path, leaf in leaves_with_paths)
  paths = [path for path, _ in entries]
  if len(set(paths)) != len(paths):
    raise ValueError(f"hash_pytree: key paths are not unique ({paths}); cannot hash unambiguously")
  digest = hashlib.sha256(b"mteo_jax.hash_pytree.v1")
  digest.update(len(entries).to_bytes(8, "little"))
  for path, leaf in entries:
    dtype_name, array = _leaf_to_numpy(leaf)
    _update_framed(digest, path.encode())
    _update_framed(digest, dtype_name.encode())
    _update_framed(digest, json.dumps(list(array.shape)).encode())
    _update_framed(digest, array.tobytes())
  return digest.hexdigest()


def _float_to_jsonable(value: float) -> float | str:
  # JSON has no NaN/inf; spell them as strings rather than emit non-standard tokens.
  return value if math.isfinite(value) else repr(value)


def to_jsonable(obj: Any) -> Any:
  """A JSON-ready copy of ``obj``: dataclasses become dicts tagged with their class, arrays dicts with dtype and shape.

  Floats are kept as Python floats, whose JSON repr round-trips exactly (float32 values are exact in float64), so
  equal JSON means equal bits. Unsupported types are an error rather than a silently lossy ``str()``.
  """
  if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
    fields = {f.name: to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    return {"__class__": type(obj).__name__, **fields}
  if isinstance(obj, dict):
    out = {}
    for key, value in obj.items():
      if not isinstance(key, str):
        raise TypeError(f"to_jsonable: dict keys must be strings, got {key!r} of type {type(key).__name__}")
      out[key] = to_jsonable(value)
    return out
  if obj is None or isinstance(obj, (bool, str)):
    return obj
  if isinstance(obj, (int, np.integer)) and not isinstance(obj, np.bool_):
    return int(obj)
  if isinstance(obj, np.bool_):
    return bool(obj)
  if isinstance(obj, (float, np.floating)):
    return _float_to_jsonable(float(obj))
  if isinstance(obj, (list, tuple)):
    return [to_jsonable(value) for value in obj]
  if isinstance(obj, np.dtype) or (isinstance(obj, type) and issubclass(obj, np.generic)):
    return np.dtype(obj).name
  if isinstance(obj, (np.ndarray, jax.Array)):
    dtype_name, array = _leaf_to_numpy(obj)
    out = {"__array__": dtype_name, "shape": list(array.shape)}
    if array.size <= _MAX_INLINE_ARRAY_SIZE and not dtype_name.startswith("key<"):
      out["values"] = to_jsonable(array.ravel().tolist())
    out["sha256"] = hash_pytree(array)
    return out
  raise TypeError(f"to_jsonable: unsupported type {type(obj).__name__}; expected a dataclass, dict, list, tuple, "
                  "number, string, None, dtype or array")


def canonical_json(obj: Any, *, indent: int | None = None) -> str:
  """Canonical JSON text of ``obj`` (sorted keys, no whitespace unless ``indent``)."""
  separators = (",", ":") if indent is None else (",", ": ")
  return json.dumps(to_jsonable(obj), sort_keys=True, separators=separators, indent=indent, allow_nan=False)


def hash_json(obj: Any) -> str:
  """sha256 hex digest of ``canonical_json(obj)``."""
  return hashlib.sha256(canonical_json(obj).encode()).hexdigest()
