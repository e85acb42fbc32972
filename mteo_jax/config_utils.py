"""The boundary between ml_collections configs and the typed frozen dataclasses that the code uses (STYLE §4).

``from_dict(cls, config.train)`` builds a dataclass from a config section, checking every key and type on the way,
so that a misspelt override (``--config.train.step=10``) or a wrong type fails at start-up with the dotted name of the
offending key instead of deep inside a jitted function. ``to_plain`` turns configs and dataclasses into JSON-ready
dicts (checkpoint metadata), and ``diff`` lists the dotted keys at which two such dicts disagree.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Collection, Mapping, TypeVar

import ml_collections
import numpy as np

T = TypeVar("T")


def to_plain(value: Any) -> Any:
  """ConfigDicts, dataclasses, tuples and numpy scalars -> nested dicts, lists and Python scalars (JSON-ready)."""
  if isinstance(value, ml_collections.ConfigDict):
    value = value.to_dict()
  if dataclasses.is_dataclass(value) and not isinstance(value, type):
    value = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
  if isinstance(value, Mapping):
    return {str(k): to_plain(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [to_plain(v) for v in value]
  if isinstance(value, np.ndarray):
    return value.tolist()
  if isinstance(value, np.generic):
    return value.item()
  if value is None or isinstance(value, (bool, int, float, str)):
    return value
  raise TypeError(f"cannot store a value of type {type(value).__name__} in a config: {value!r}")


def tuples_from_lists(value: Any) -> Any:
  """The inverse of JSON's tuple -> list for module options read back from metadata (Flax wants tuples)."""
  if isinstance(value, Mapping):
    return {k: tuples_from_lists(v) for k, v in value.items()}
  if isinstance(value, list):
    return tuple(tuples_from_lists(v) for v in value)
  return value


def from_dict(cls: type[T], mapping: Any, *, where: str = "config") -> T:
  """Builds the dataclass ``cls`` from a mapping (or ConfigDict); unknown, missing or mistyped keys are errors."""
  mapping = to_plain(mapping)
  if not isinstance(mapping, Mapping):
    raise TypeError(f"{where} must be a mapping with keys {[f.name for f in dataclasses.fields(cls)]}, "
                    f"got {type(mapping).__name__}")
  fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
  unknown = sorted(set(mapping) - set(fields))
  if unknown:
    raise ValueError(f"unknown key(s) {[f'{where}.{k}' for k in unknown]}; valid keys of {where}: {sorted(fields)}")
  missing = [name for name, f in fields.items() if name not in mapping and f.default is dataclasses.MISSING
             and f.default_factory is dataclasses.MISSING]
  if missing:
    raise ValueError(f"missing key(s) {[f'{where}.{k}' for k in missing]}")
  hints = typing.get_type_hints(cls)
  kwargs = {name: _convert(hints[name], value, f"{where}.{name}") for name, value in mapping.items()}
  return cls(**kwargs)


def _convert(annotation: Any, value: Any, where: str) -> Any:
  origin, args = typing.get_origin(annotation), typing.get_args(annotation)
  if annotation is Any:
    return value
  if origin in (typing.Union, types.UnionType):
    if value is None and type(None) in args:
      return None
    errors = []
    for arg in (a for a in args if a is not type(None)):
      try:
        return _convert(arg, value, where)
      except (TypeError, ValueError) as e:
        errors.append(str(e))
    raise TypeError(f"{where}: {value!r} matches none of {annotation}: {'; '.join(errors)}")
  if dataclasses.is_dataclass(annotation):
    return from_dict(annotation, value, where=where)
  if origin in (dict, Mapping) or annotation is dict:
    if not isinstance(value, Mapping):
      raise TypeError(f"{where} must be a mapping, got {type(value).__name__}")
    return dict(value)
  if origin is tuple or annotation is tuple:
    if not isinstance(value, (list, tuple)):
      raise TypeError(f"{where} must be a sequence, got {type(value).__name__}")
    item_type = args[0] if args and (len(args) == 2 and args[1] is Ellipsis) else Any
    return tuple(_convert(item_type, v, f"{where}[{i}]") for i, v in enumerate(value))
  if annotation is float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      raise TypeError(f"{where} must be a number, got {value!r}")
    return float(value)
  if annotation is int:
    if isinstance(value, bool) or not isinstance(value, int):
      raise TypeError(f"{where} must be an integer, got {value!r}")
    return value
  if annotation in (bool, str):
    if not isinstance(value, annotation):
      raise TypeError(f"{where} must be a {annotation.__name__}, got {value!r}")
    return value
  raise TypeError(f"{where}: unsupported field type {annotation}")


def diff(a: Mapping[str, Any], b: Mapping[str, Any], *, ignore: Collection[str] = (), prefix: str = "") -> list[str]:
  """Dotted keys at which two nested dicts differ (missing on one side counts), except those in ``ignore``."""
  keys = []
  for key in sorted(set(a) | set(b)):
    name = f"{prefix}{key}"
    if name in ignore:
      continue
    if key not in a or key not in b:
      keys.append(name)
    elif isinstance(a[key], Mapping) and isinstance(b[key], Mapping):
      keys.extend(diff(a[key], b[key], ignore=ignore, prefix=f"{name}."))
    elif a[key] != b[key]:
      keys.append(name)
  return keys
