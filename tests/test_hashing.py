"""Content hashes: equal content -> equal hash; any change of a leaf, dtype, shape or key -> a different hash."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.core import FrozenDict

from mteo_jax.diffusion import Preconditioning
from mteo_jax.hashing import canonical_json, hash_json, hash_pytree, to_jsonable
from mteo_jax.nets import get_backbone


def _tree():
  return {"dense": {"kernel": np.arange(6, dtype=np.float32).reshape(2, 3), "bias": np.zeros(3, np.float32)},
          "scale": np.float32(2.0), "steps": [np.int32(1), np.ones((2,), np.int32)]}


def test_equal_trees_equal_hash_across_containers_and_array_kinds():
  tree = _tree()
  same = jax.tree.map(jnp.asarray, _tree())                  # jax arrays instead of numpy
  frozen = FrozenDict(_tree())                               # Flax's frozen container
  assert hash_pytree(tree) == hash_pytree(same) == hash_pytree(frozen)
  assert hash_pytree(np.ones(3, np.float32)) == hash_pytree(jnp.ones(3, jnp.float32))


def test_flax_params_hash_is_stable_and_sensitive():
  backbone = get_backbone("mlp", (2,), data_dim=2, width=16, depth=2, emb_dim=8, noise_channels=8)
  init = jax.jit(backbone.init)   # one compile instead of an op-by-op eager init
  params = init(jax.random.key(0))
  assert hash_pytree(params) == hash_pytree(init(jax.random.key(0)))
  assert hash_pytree(params) != hash_pytree(init(jax.random.key(1)))
  leaves, treedef = jax.tree.flatten(params)
  # one float of one leaf changed by one ulp
  bumped = np.array(leaves[0])
  bumped.flat[0] = np.nextafter(bumped.flat[0], np.float32(np.inf))
  changed = jax.tree.unflatten(treedef, [jnp.asarray(bumped)] + leaves[1:])
  assert hash_pytree(changed) != hash_pytree(params)


@pytest.mark.parametrize("change", ["value", "dtype", "shape", "key", "extra_leaf", "nested_key"])
def test_any_change_changes_hash(change):
  tree = _tree()
  if change == "value":
    tree["dense"]["bias"] = tree["dense"]["bias"].copy()
    tree["dense"]["bias"][1] = -0.0          # -0.0 == 0.0 as a number, but not as bytes
  elif change == "dtype":
    tree["dense"]["bias"] = tree["dense"]["bias"].astype(np.float64)
  elif change == "shape":
    tree["dense"]["kernel"] = tree["dense"]["kernel"].reshape(3, 2)   # same bytes, other shape
  elif change == "key":
    tree["dense"]["b"] = tree["dense"].pop("bias")
  elif change == "extra_leaf":
    tree["new"] = np.zeros((), np.float32)
  else:
    tree = {"outer": tree}
  assert hash_pytree(tree) != hash_pytree(_tree())


def test_hash_is_a_sha256_hex_digest_and_handles_scalars_and_keys():
  digest = hash_pytree({"a": 1.0})
  assert len(digest) == 64 and int(digest, 16) >= 0
  assert hash_pytree({"k": jax.random.key(0)}) != hash_pytree({"k": jax.random.key(1)})
  assert hash_pytree(np.ones(2, np.float32)) != hash_pytree(jnp.ones(2, jnp.bfloat16))
  with pytest.raises(TypeError, match="object array"):
    hash_pytree({"a": object()})


def test_hash_json_canonical_and_exact():
  precond = Preconditioning()
  assert hash_json(precond) == hash_json(Preconditioning(kind="edm"))
  assert hash_json(precond) != hash_json(Preconditioning(sigma_data=0.25))
  assert hash_json({"a": 1, "b": [1.0, 2.0]}) == hash_json({"b": (1.0, 2.0), "a": 1})   # key order, tuple vs list
  assert hash_json({"x": 0.1}) != hash_json({"x": np.nextafter(0.1, 1.0)})             # exact float repr
  sigmas = np.array([80.0, 1.0, 0.002], np.float32)
  assert hash_json({"s": sigmas}) != hash_json({"s": sigmas.astype(np.float64)})      # dtype is part of it
  bumped = sigmas.copy()
  bumped[2] = np.nextafter(bumped[2], np.float32(1))
  assert hash_json({"s": sigmas}) != hash_json({"s": bumped})
  assert hash_json({"s": np.zeros(10_000)}) != hash_json({"s": np.ones(10_000)})       # large arrays: by content hash


def test_canonical_json_is_readable_json():
  text = canonical_json({"precond": Preconditioning(), "nan": float("nan"), "dtype": np.float32}, indent=2)
  parsed = json.loads(text)
  assert parsed["precond"]["__class__"] == "Preconditioning" and parsed["precond"]["sigma_max"] == 80.0
  assert parsed["nan"] == "nan" and parsed["dtype"] == "float32"
  assert to_jsonable(np.array([0.5, 2.0], np.float32))["values"] == [0.5, 2.0]


def test_unsupported_inputs_are_clear_errors():
  @dataclasses.dataclass
  class Holder:
    fn: object

  with pytest.raises(TypeError, match="unsupported type function"):
    hash_json(Holder(lambda: 0))
  with pytest.raises(TypeError, match="dict keys must be strings"):
    hash_json({1: 2})
