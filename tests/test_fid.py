"""Standard FID (``mteo_jax.fid``): the network's features, the Fréchet distance against SciPy, the weights loader on
files this test writes in PyTorch's zip and legacy formats (no PyTorch needed), its refusal of anything but tensors,
the preprocessing against a numpy transcription of torch's bilinear kernel, the reference statistics, and the
harness's settings.

Every feature computation of the default tests uses one input shape ([2, 8, 8, 1] uint8) resized to 75 x 75, the
network's smallest input: the same layers at 1/16 of the cost of 299, compiled once for the file. The standard 299
pipeline runs end to end in the slow test.
"""

from __future__ import annotations

import collections
import io
import json
import pickle
import struct
import zipfile

import jax
import numpy as np
import pytest
import scipy.linalg

from mteo_jax import comparison, fid, harness, modes
from mteo_jax.teachers import Teacher

SMALL = 75   # the resize target of the default tests' feature computations

# torch storage class names of the numpy dtypes the writers below use.
_STORAGE_NAMES = {np.dtype(np.float32): "FloatStorage", np.dtype(np.int64): "LongStorage"}


# --- writing torch.save's formats without torch -----------------------------------------------------------------------

class _Global:
  """A global written as pickle's ``GLOBAL module name`` without importing it (``torch`` is not installed)."""

  def __init__(self, module: str, name: str):
    self.module, self.name = module, name

  def __call__(self, *args):
    raise AssertionError("a marker, never called")


class _Storage:
  """A torch storage stand-in: a flat array written as raw little-endian bytes under ``key``."""

  def __init__(self, key: str, array: np.ndarray):
    self.key, self.array = key, np.ascontiguousarray(array).ravel()


class _View:
  """A legacy-format storage view: ``numel`` elements of ``root`` from ``offset``."""

  def __init__(self, key: str, root: _Storage, offset: int, numel: int):
    self.key, self.root, self.offset, self.numel = key, root, offset, numel


class _Tensor:
  """Pickles as torch does a tensor: ``torch._utils._rebuild_tensor_v2(storage, offset, size, stride, False, {})``."""

  def __init__(self, storage, offset: int, size: tuple, stride: tuple):
    self.storage, self.offset, self.size, self.stride = storage, offset, size, stride

  def __reduce__(self):
    return (_Global("torch._utils", "_rebuild_tensor_v2"),
            (self.storage, self.offset, self.size, self.stride, False, collections.OrderedDict()))


class _TorchPickler(pickle._Pickler):
  """Protocol 2 with storages as persistent ids, as ``torch.save`` writes them: zip ``('storage', type, key,
  location, numel)``, legacy ``('storage', type, root_key, location, root_numel, view_metadata)``."""
  dispatch = pickle._Pickler.dispatch.copy()

  def __init__(self, file, legacy: bool):
    super().__init__(file, protocol=2)
    self.legacy = legacy

  def save_global_marker(self, obj):
    self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())
    self.memoize(obj)

  dispatch[_Global] = save_global_marker

  def persistent_id(self, obj):
    if isinstance(obj, _View):
      root = obj.root
      return ("storage", _Global("torch", _STORAGE_NAMES[root.array.dtype]), root.key, "cpu", root.array.size,
              (obj.key, obj.offset, obj.numel))
    if isinstance(obj, _Storage):
      storage_type = _Global("torch", _STORAGE_NAMES[obj.array.dtype])
      if self.legacy:
        return ("storage", storage_type, obj.key, "cpu", obj.array.size, None)
      return ("storage", storage_type, obj.key, "cpu", obj.array.size)
    return None


def _contiguous_strides(shape) -> tuple:
  return tuple(int(np.prod(shape[i + 1:])) for i in range(len(shape)))


def _torch_style_state(state: dict[str, np.ndarray]) -> tuple[collections.OrderedDict, list[_Storage]]:
  """The state dict as tensors on storages, with what torch files have beside plain tensors: two tensors sharing one
  storage at offsets, a non-contiguous (transposed) tensor, a 0-d int64 ``num_batches_tracked``, ``_metadata``."""
  tensors, storages = collections.OrderedDict(), []
  shared = ("Conv2d_1a_3x3.bn.running_mean", "Conv2d_1a_3x3.bn.running_var")
  transposed = "Conv2d_2a_3x3.conv.weight"
  for name, value in state.items():
    if name in shared:
      continue
    if name == transposed:   # stored as [O, I, W, H]: strides of the transpose
      storage = _Storage(str(len(storages)), value.transpose(0, 1, 3, 2))
      _, i, h, w = value.shape
      tensors[name] = _Tensor(storage, 0, value.shape, (i * h * w, h * w, 1, w))
    else:
      storage = _Storage(str(len(storages)), value)
      tensors[name] = _Tensor(storage, 0, value.shape, _contiguous_strides(value.shape))
    storages.append(storage)
  both = _Storage(str(len(storages)), np.concatenate([state[shared[0]], state[shared[1]]]))
  storages.append(both)
  tensors[shared[0]] = _Tensor(both, 0, state[shared[0]].shape, (1,))
  tensors[shared[1]] = _Tensor(both, state[shared[0]].size, state[shared[1]].shape, (1,))
  counter = _Storage(str(len(storages)), np.array([7], np.int64))
  storages.append(counter)
  tensors["Conv2d_1a_3x3.bn.num_batches_tracked"] = _Tensor(counter, 0, (), ())
  tensors._metadata = collections.OrderedDict({"": {"version": 1}, "Conv2d_1a_3x3.bn": {"version": 2}})
  return tensors, storages


def _pickle_bytes(obj, legacy: bool) -> bytes:
  buffer = io.BytesIO()
  _TorchPickler(buffer, legacy).dump(obj)
  return buffer.getvalue()


def write_zip_state_dict(path, state: dict[str, np.ndarray] | None = None, *, data_pkl: bytes | None = None) -> None:
  """``torch.save(state, path)`` in the zip format (PyTorch >= 1.6): ``<name>/data.pkl``, ``<name>/data/<key>``,
  ``<name>/byteorder``, ``<name>/version``; ``data_pkl`` replaces the pickle (for refusal tests)."""
  storages = []
  if data_pkl is None:
    tensors, storages = _torch_style_state(state)
    data_pkl = _pickle_bytes(tensors, legacy=False)
  with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
    archive.writestr("pt_inception/data.pkl", data_pkl)
    archive.writestr("pt_inception/byteorder", "little")
    for storage in storages:
      archive.writestr(f"pt_inception/data/{storage.key}", storage.array.astype(storage.array.dtype.newbyteorder("<"))
                       .tobytes())
    archive.writestr("pt_inception/version", "3\n")


def write_legacy_state_dict(path, state: dict[str, np.ndarray] | None = None, *, data_pkl: bytes | None = None) -> None:
  """``torch.save`` before PyTorch 1.6: pickles of the magic number, the protocol version and the system info, the
  pickled object, the sorted storage keys, then each storage as an int64 element count and its raw bytes."""
  storages = []
  if data_pkl is None:
    tensors, storages = _torch_style_state(state)
    # One tensor on a storage view, as old PyTorch wrote views of shared storages.
    name = "Conv2d_1a_3x3.bn.bias"
    root = _Storage("view_root", np.concatenate([np.zeros(5, np.float32), state[name]]))
    storages = [s for s in storages if s is not tensors[name].storage] + [root]   # torch writes used storages only
    tensors[name] = _Tensor(_View("view_of_root", root, 5, state[name].size), 0, state[name].shape, (1,))
    data_pkl = _pickle_bytes(tensors, legacy=True)
  keys = sorted({s.key for s in storages})
  by_key = {s.key: s for s in storages}
  with open(path, "wb") as file:
    pickle.dump(fid.LEGACY_MAGIC_NUMBER, file, protocol=2)
    pickle.dump(fid.LEGACY_PROTOCOL_VERSION, file, protocol=2)
    pickle.dump({"protocol_version": 1001, "little_endian": True, "type_sizes": {"short": 2, "int": 4, "long": 4}},
                file, protocol=2)
    file.write(data_pkl)
    pickle.dump(keys, file, protocol=2)
    for key in keys:
      array = by_key[key].array
      file.write(struct.pack("<q", array.size))
      file.write(array.astype(array.dtype.newbyteorder("<")).tobytes())


def _call_pickle(module: str, name: str, argument: str) -> bytes:
  """Protocol-2 opcodes of ``module.name(argument)``: what a malicious weights file holds."""
  arg = argument.encode()
  return (b"\x80\x02c" + module.encode() + b"\n" + name.encode() + b"\n" + b"X" + struct.pack("<I", len(arg)) + arg
          + b"\x85R.")


# --- fixtures ---------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def variables():
  return fid.init_variables(jax.random.key(0))


@pytest.fixture(scope="module")
def images():
  """[2, 8, 8, 1] uint8 grayscale images: the one input shape of every feature computation in this file."""
  return np.random.default_rng(0).integers(0, 256, (2, 8, 8, 1), dtype=np.uint8)


@pytest.fixture(scope="module")
def features(variables, images):
  return fid.InceptionFeatures(variables, progress=False, resolution=SMALL).features(images)


def _assert_variables_equal(got, expected):
  assert jax.tree.structure(got) == jax.tree.structure(expected)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
    assert a.dtype == np.float32 and a.shape == b.shape
    np.testing.assert_array_equal(a, b)


# --- the network ------------------------------------------------------------------------------------------------------

def test_random_weight_features_are_deterministic_2048_d(variables, images, features):
  assert features.shape == (2, fid.FEATURE_DIM) and features.dtype == np.float32
  assert np.isfinite(features).all() and np.std(features) > 0 and not np.array_equal(features[0], features[1])
  again = fid.InceptionFeatures(variables, progress=True, resolution=SMALL).features(images)   # a new one, with a bar
  np.testing.assert_array_equal(again, features)
  np.testing.assert_array_equal(fid.init_variables(jax.random.key(0))["params"]["Mixed_7c"]["branch_pool"]["conv"]
                                ["kernel"], variables["params"]["Mixed_7c"]["branch_pool"]["conv"]["kernel"])


def test_variables_have_the_torch_layout():
  layout = fid._variable_layout()
  assert len(layout) == 94 * 5   # 94 BasicConv2d layers: a kernel and four BatchNorm arrays each
  assert layout["Conv2d_1a_3x3.conv.weight"] == (("params", "Conv2d_1a_3x3", "conv", "kernel"), (3, 3, 3, 32))
  assert layout["Mixed_6b.branch7x7_2.conv.weight"][1] == (1, 7, 128, 128)
  assert layout["Mixed_7c.branch_pool.bn.running_var"][0] == ("batch_stats", "Mixed_7c", "branch_pool", "bn", "var")
  assert layout["Mixed_5b.branch_pool.conv.weight"][1] == (1, 1, 192, 32)


def test_avg_pool_leaves_the_padding_out_of_the_mean():
  x = np.arange(16, dtype=np.float32).reshape(1, 4, 4, 1)
  pooled = np.asarray(fid._avg_pool_3x3_same(x))[0, :, :, 0]
  assert pooled[0, 0] == np.mean(x[0, :2, :2, 0]) and pooled[1, 1] == np.mean(x[0, :3, :3, 0])


# --- preprocessing ----------------------------------------------------------------------------------------------------

def _torch_bilinear_reference(image: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
  """torch's CPU ``upsample_bilinear2d(align_corners=False)`` on [H, W, C], transcribed in its float32 arithmetic
  (``UpSample.h``: ``area_pixel_compute_source_index``, ``guard_index_and_lambda``; the kernel's nesting
  ``h0l * (w0l * x00 + w1l * x01) + h1l * (w0l * x10 + w1l * x11)``), one output pixel at a time."""
  def tap(size_in, size_out, i):
    scale = np.float32(size_in) / np.float32(size_out)
    src = max(scale * (np.float32(i) + np.float32(0.5)) - np.float32(0.5), np.float32(0))
    index0 = min(int(np.floor(src)), size_in - 1)
    lambda1 = min(max(src - np.float32(index0), np.float32(0)), np.float32(1))
    return index0, index0 + (1 if index0 < size_in - 1 else 0), np.float32(1) - lambda1, lambda1
  x = image.astype(np.float32)
  h0, h1, h0l, h1l = (np.array(v)[:, None] for v in zip(*[tap(image.shape[0], out_h, i) for i in range(out_h)]))
  w0, w1, w0l, w1l = (np.array(v)[None, :] for v in zip(*[tap(image.shape[1], out_w, j) for j in range(out_w)]))
  h0l, h1l, w0l, w1l = (w[..., None] for w in (h0l, h1l, w0l, w1l))   # weights over the channels too
  return h0l * (w0l * x[h0, w0] + w1l * x[h0, w1]) + h1l * (w0l * x[h1, w0] + w1l * x[h1, w1])   # float32 throughout


@pytest.mark.parametrize("in_shape,size", [((8, 8), 299), ((28, 28), 299), ((7, 12), 299), ((40, 40), 13),
                                           ((311, 300), 299), ((299, 299), 299)])
def test_resize_matches_torch_bilinear_half_pixel(in_shape, size):
  image = np.random.default_rng(1).uniform(0, 1, in_shape + (3,)).astype(np.float32)
  got = np.asarray(fid.resize_bilinear(image[None], size))[0]
  np.testing.assert_allclose(got, _torch_bilinear_reference(image, size, size), rtol=0, atol=3e-7)
  if in_shape == (size, size):
    np.testing.assert_array_equal(got, image)


def test_to_uint8_and_preprocess_follow_the_reference():
  floats = np.array([-1.5, -1.0, -0.5, 0.0, 0.999, 1.0, 2.0], np.float32).reshape(1, 7, 1, 1)
  np.testing.assert_array_equal(fid.to_uint8(floats).ravel(), [0, 0, 64, 128, 255, 255, 255])
  as_uint8 = np.random.default_rng(2).integers(0, 256, (1, 5, 5, 3), dtype=np.uint8)
  assert fid.to_uint8(as_uint8) is as_uint8
  with pytest.raises(TypeError, match="uint8 images or float"):
    fid.to_uint8(as_uint8.astype(np.int32))
  with pytest.raises(ValueError, match="NaN"):
    fid.to_uint8(np.full((1, 2, 2, 1), np.nan, np.float32))
  with pytest.raises(ValueError, match=r"\[N >= 1, H, W, C in \(1, 3\)\]"):
    fid.to_uint8(np.zeros((2, 4, 4, 2), np.float32))
  gray = as_uint8[..., :1]
  x = np.asarray(fid.preprocess(gray, 75))
  assert x.shape == (1, 75, 75, 3) and np.array_equal(x[..., 0], x[..., 2])
  expected = 2 * _torch_bilinear_reference(np.repeat(gray[0], 3, -1) / 255.0, 75, 75) - 1
  np.testing.assert_allclose(x[0], expected, atol=5e-6)


# --- the Fréchet distance and the statistics --------------------------------------------------------------------------

def _scipy_frechet(mu1, sigma1, mu2, sigma2) -> float:
  covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
  return float(np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean.real))


@pytest.mark.parametrize("num_samples", [200, 12], ids=["full_rank", "rank_deficient"])
def test_frechet_distance_matches_scipy_sqrtm(num_samples):
  rng = np.random.default_rng(3)
  dim = 32
  mu1, sigma1 = fid.metrics.gaussian_stats(rng.standard_normal((num_samples, dim)) @ rng.standard_normal((dim, dim)))
  mu2, sigma2 = fid.metrics.gaussian_stats(rng.standard_normal((num_samples, dim)) * 1.5 + 0.3)
  if num_samples < dim:
    assert np.linalg.matrix_rank(sigma1) == np.linalg.matrix_rank(sigma2) == num_samples - 1
  got = fid.frechet_distance(mu1, sigma1, mu2, sigma2)
  np.testing.assert_allclose(got, _scipy_frechet(mu1, sigma1, mu2, sigma2), rtol=1e-6)
  np.testing.assert_allclose(fid.frechet_distance(mu2, sigma2, mu1, sigma1), got, rtol=1e-8)
  assert abs(fid.frechet_distance(mu1, sigma1, mu1, sigma1)) < 1e-9 * np.trace(sigma1)


@pytest.mark.parametrize("num_samples", [200, 12], ids=["full_rank", "rank_deficient"])
def test_frechet_distance_from_features_takes_the_small_route_to_the_same_value(num_samples):
  rng = np.random.default_rng(6)
  dim = 32
  features = rng.standard_normal((num_samples, dim)) @ rng.standard_normal((dim, dim))
  mu, sigma = fid.metrics.gaussian_stats(rng.standard_normal((300, dim)) + 0.2)
  expected = _scipy_frechet(*fid.metrics.gaussian_stats(features), mu, sigma)
  np.testing.assert_allclose(fid.frechet_distance_from_features(features, mu, sigma), expected, rtol=1e-6)
  own_mu, own_sigma = fid.metrics.gaussian_stats(features)
  assert abs(fid.frechet_distance_from_features(features, own_mu, own_sigma)) < 1e-9 * np.trace(own_sigma)


def test_frechet_distance_refuses_what_is_not_a_covariance():
  with pytest.raises(ValueError, match="expected mu"):
    fid.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
  with pytest.raises(ValueError, match="not positive semi-definite"):
    fid.frechet_distance(np.zeros(2), np.diag([1.0, -1.0]), np.zeros(2), np.eye(2))
  with pytest.raises(ValueError, match="NaN"):
    fid.frechet_distance(np.array([np.nan, 0]), np.eye(2), np.zeros(2), np.eye(2))
  with pytest.raises(ValueError, match="sigma2 is not positive semi-definite"):
    fid.frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), np.diag([1.0, -1.0]))
  with pytest.raises(ValueError, match="sigma is not positive semi-definite"):
    fid.frechet_distance_from_features(np.eye(3, 4), np.zeros(4), -np.eye(4))


def test_stats_npz_round_trip_and_bad_files_are_refused(tmp_path):
  rng = np.random.default_rng(4)
  mu, sigma = fid.metrics.gaussian_stats(rng.standard_normal((50, fid.FEATURE_DIM)))
  fid.save_stats(tmp_path / "ref.npz", mu, sigma)
  loaded = fid.load_stats(tmp_path / "ref.npz")
  np.testing.assert_array_equal(loaded[0], mu)
  np.testing.assert_array_equal(loaded[1], sigma)
  np.savez(tmp_path / "no_sigma.npz", mu=mu, cov=sigma)
  with pytest.raises(ValueError, match=r"holds \['mu', 'cov'\].*'mu' \[F\] and 'sigma' \[F, F\]"):
    fid.load_stats(tmp_path / "no_sigma.npz")
  np.savez(tmp_path / "mismatched.npz", mu=mu, sigma=sigma[:10, :10])
  with pytest.raises(ValueError, match=r"shapes \[2048\] and \[2048, 2048\], got \(2048,\) and \(10, 10\)"):
    fid.load_stats(tmp_path / "mismatched.npz")
  np.savez(tmp_path / "small.npz", mu=mu[:10], sigma=sigma[:10, :10])
  with pytest.raises(ValueError, match=r"\[2048\]"):
    fid.load_stats(tmp_path / "small.npz")
  assert fid.load_stats(tmp_path / "small.npz", dim=None)[0].shape == (10,)
  (tmp_path / "text.npz").write_text("not a zip")
  with pytest.raises(ValueError, match="not a reference-statistics .npz"):
    fid.load_stats(tmp_path / "text.npz")
  with pytest.raises(FileNotFoundError, match="missing.npz do not exist"):
    fid.load_stats(tmp_path / "missing.npz")


# --- the weights loader -----------------------------------------------------------------------------------------------

def _state_with_fc(variables) -> dict[str, np.ndarray]:
  state = fid.state_dict_from_variables(variables)
  rng = np.random.default_rng(5)
  state["fc.weight"] = rng.standard_normal((fid.NUM_CLASSES, fid.FEATURE_DIM)).astype(np.float32)
  state["fc.bias"] = rng.standard_normal(fid.NUM_CLASSES).astype(np.float32)
  return state


@pytest.fixture(scope="module")
def zip_weights(tmp_path_factory, variables):
  """``(path, state)``: the random weights with an ``fc`` layer, written in the zip format."""
  state = _state_with_fc(variables)
  path = tmp_path_factory.mktemp("weights") / "pt_inception.pth"
  write_zip_state_dict(path, state)
  return path, state


def test_zip_state_dict_loads_exactly_and_gives_the_same_features(zip_weights, variables, images, features):
  path, state = zip_weights
  read = fid.read_state_dict(path)
  assert set(read) == set(state) | {"Conv2d_1a_3x3.bn.num_batches_tracked"}
  np.testing.assert_array_equal(read["Conv2d_2a_3x3.conv.weight"], state["Conv2d_2a_3x3.conv.weight"])  # strided
  np.testing.assert_array_equal(read["Conv2d_1a_3x3.bn.running_var"], state["Conv2d_1a_3x3.bn.running_var"])
  assert read["Conv2d_1a_3x3.bn.num_batches_tracked"].shape == () and read["fc.weight"].shape == (1008, 2048)
  loaded = fid.load_inception_weights(path)
  _assert_variables_equal(loaded, jax.tree.map(np.asarray, variables))
  np.testing.assert_array_equal(loaded["params"]["Conv2d_1a_3x3"]["conv"]["kernel"],
                                state["Conv2d_1a_3x3.conv.weight"].transpose(2, 3, 1, 0))   # OIHW -> HWIO
  np.testing.assert_array_equal(fid.InceptionFeatures(loaded, progress=False, resolution=SMALL).features(images),
                                features)


def test_legacy_state_dict_loads_exactly(tmp_path, variables):
  path = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
  write_legacy_state_dict(path, _state_with_fc(variables))
  _assert_variables_equal(fid.load_inception_weights(path), jax.tree.map(np.asarray, variables))


def test_npz_round_trip_through_the_convert_command(tmp_path, zip_weights, variables, capsys):
  source, converted = zip_weights[0], tmp_path / "weights.npz"
  assert fid.main(["convert", str(source), str(converted)]) == 0
  assert "wrote 473 tensors" in capsys.readouterr().out   # 470 + fc.weight, fc.bias, num_batches_tracked
  with np.load(converted, allow_pickle=False) as npz:
    assert "Mixed_5b.branch1x1.conv.weight" in npz.files and npz["Mixed_5b.branch1x1.conv.weight"].shape == \
        (64, 192, 1, 1)
  _assert_variables_equal(fid.load_inception_weights(converted), jax.tree.map(np.asarray, variables))


@pytest.mark.parametrize("fmt", ["zip", "legacy"])
@pytest.mark.parametrize("module,name,argument", [
    ("os", "system", "touch {sentinel}"),
    ("builtins", "eval", "open({sentinel!r}, 'w').close()"),
    ("torch.storage", "_load_from_bytes", "x"),
])
def test_loader_refuses_a_pickle_that_asks_for_more_than_tensors(tmp_path, fmt, module, name, argument):
  sentinel = tmp_path / "ran"
  path = tmp_path / "evil.pth"
  data_pkl = _call_pickle(module, name, argument.format(sentinel=str(sentinel)))
  (write_zip_state_dict if fmt == "zip" else write_legacy_state_dict)(path, data_pkl=data_pkl)
  refused = f"refused to load the global {module}.{name}: .*nothing in it was run"
  with pytest.raises(pickle.UnpicklingError, match=refused):
    fid.load_inception_weights(path)
  with pytest.raises(pickle.UnpicklingError, match="refused"):
    fid.main(["convert", str(path), str(tmp_path / "out.npz")])
  assert not sentinel.exists() and not (tmp_path / "out.npz").exists()


def test_loader_refuses_a_tensor_outside_its_storage(tmp_path):
  storage = _Storage("0", np.arange(5, dtype=np.float32))
  path = tmp_path / "overrun.pth"
  write_zip_state_dict(path, data_pkl=_pickle_bytes({"x": _Tensor(storage, 2, (4,), (1,))}, legacy=False))
  with zipfile.ZipFile(path, "a") as archive:
    archive.writestr("pt_inception/data/0", storage.array.tobytes())
  with pytest.raises(ValueError, match="overruns its storage of 5 elements"):
    fid.read_state_dict(path)


def test_wrong_keys_and_shapes_are_listed_in_one_error(tmp_path, variables):
  state = _state_with_fc(variables)
  del state["Mixed_6a.branch3x3.bn.running_mean"]
  state["AuxLogits.fc.weight"] = np.zeros((1008, 768), np.float32)
  state["Mixed_7c.branch1x1.conv.weight"] = np.zeros((320, 2048, 3, 3), np.float32)
  state["fc.weight"] = np.zeros((1000, 2048), np.float32)
  np.savez(tmp_path / "bad.npz", **state)
  with pytest.raises(ValueError) as error:
    fid.load_inception_weights(tmp_path / "bad.npz")
  message = str(error.value)
  for expected in ("1 missing: ['Mixed_6a.branch3x3.bn.running_mean']", "1 unexpected: ['AuxLogits.fc.weight']",
                   "Mixed_7c.branch1x1.conv.weight: float32[320, 2048, 3, 3], expected float[320, 2048, 1, 1]",
                   "fc.weight: [1000, 2048], expected [1008, 2048]", fid.WEIGHTS_FILE):
    assert expected in message
  (tmp_path / "junk.pth").write_bytes(b"junk")
  with pytest.raises(ValueError, match="neither a torch.save file"):
    fid.load_inception_weights(tmp_path / "junk.pth")


def test_missing_weights_say_which_file_and_where_to_put_it(tmp_path):
  missing = tmp_path / "nowhere" / fid.WEIGHTS_FILE
  with pytest.raises(FileNotFoundError) as error:
    fid.load_inception_weights(missing)
  for expected in (str(missing), "pt_inception-2015-12-05-6726825d.pth", fid.WEIGHTS_URL, "fid_weights",
                   "--config.mteo.fid_weights", "MTEO_FID_WEIGHTS"):
    assert expected in str(error.value)
  assert fid.resolve_weights_path("", environ={}) is None
  with pytest.raises(FileNotFoundError, match=r"^\$MTEO_FID_WEIGHTS=.*nowhere.* does not exist\. FID needs"):
    fid.resolve_weights_path("", environ={fid.WEIGHTS_ENV: str(missing)})
  with pytest.raises(FileNotFoundError, match=r"^fid_weights=.*nowhere"):
    fid.resolve_weights_path(str(missing), environ={})


# --- the metric and the harness ---------------------------------------------------------------------------------------

def test_fid_metric_caches_the_real_statistics_and_fills_the_row(tmp_path, variables, images, monkeypatch):
  weights = tmp_path / "weights.npz"
  np.savez(weights, **fid.state_dict_from_variables(variables))
  metric = fid.FIDMetric.from_settings(weights, real=images, cache_dir=tmp_path, progress=False,
                                       resolution=SMALL)
  assert metric.reference == "held-out real images (2)" and (tmp_path / fid.REFERENCE_STATS_CACHE).is_file()
  row = harness.Evaluator(np.zeros((2, 8, 8, 1), np.float32), None, fid=metric)(fid.to_uint8(images) / 127.5 - 1)
  assert abs(row["fid"]) < 1e-6 * np.trace(metric.sigma) and row["fid_reference"] == metric.reference
  assert "fd" not in row   # the FD of the shipped nets is a different figure; FID is only ever the Inception one

  def no_features(*args, **kwargs):
    raise AssertionError("the cached statistics were not used")
  monkeypatch.setattr(fid.InceptionFeatures, "stats", no_features)
  again = fid.FIDMetric.from_settings(weights, real=images, cache_dir=tmp_path, progress=False,
                                       resolution=SMALL)
  np.testing.assert_array_equal(again.sigma, metric.sigma)
  assert again.identity == metric.identity
  fid.save_stats(tmp_path / "ref.npz", metric.mu + 1.0, metric.sigma)
  from_file = fid.FIDMetric.from_settings(weights, tmp_path / "ref.npz", progress=False, resolution=SMALL)
  assert from_file.reference == str(tmp_path / "ref.npz") and from_file.identity != metric.identity


def test_harness_settings_flow_and_missing_paths_are_refused(tmp_path, monkeypatch):
  monkeypatch.delenv(fid.WEIGHTS_ENV, raising=False)
  weights, stats = tmp_path / fid.WEIGHTS_FILE, tmp_path / "ref.npz"
  weights.write_bytes(b"")
  stats.write_bytes(b"")
  for mode, section in (("mteo", "mteo"), ("compare", "compare")):
    assert modes.base_config(mode)[section].fid_weights == "" and modes.base_config(mode)[section].fid_stats == ""
  job = comparison.CompareJobConfig(teacher="pretrained:digits", fid_weights=str(weights), fid_stats=str(stats))
  config = job.harness_config(seed=3)
  assert (config.fid_weights, config.fid_stats) == (str(weights), str(stats))
  mteo_config = modes.base_config("mteo")
  mteo_config.mteo.update({"teacher": "pretrained:digits", "fid_weights": str(weights)})
  _, typed = modes.parse(mteo_config)   # what --config.mteo.fid_weights=PATH reaches
  assert typed.mteo.harness_config(typed.seed).fid_weights == str(weights)

  missing = str(tmp_path / "missing" / fid.WEIGHTS_FILE)
  with pytest.raises(FileNotFoundError, match=r"fid_weights=.*missing.*does not exist.*MTEO_FID_WEIGHTS"):
    harness.HarnessConfig(fid_weights=missing)
  with pytest.raises(FileNotFoundError, match=r"fid_weights=.*missing"):
    comparison.CompareJobConfig(teacher="pretrained:digits", fid_weights=missing)
  mteo_config.mteo.fid_weights = missing
  with pytest.raises(modes.ConfigError, match=r"fid_weights=.*missing.*pt_inception-2015-12-05-6726825d\.pth"):
    modes.parse(mteo_config)
  with pytest.raises(FileNotFoundError, match=r"fid_stats=.*nope.npz does not exist"):
    harness.HarnessConfig(fid_weights=str(weights), fid_stats=str(tmp_path / "nope.npz"))
  with pytest.raises(ValueError, match=r"^compare\.fid_stats=.* is set but no FID weights"):
    comparison.CompareJobConfig(teacher="pretrained:digits", fid_stats=str(stats))
  monkeypatch.setenv(fid.WEIGHTS_ENV, missing)
  harness.HarnessConfig()   # the environment is read where FID is asked for, not by every default config
  with pytest.raises(FileNotFoundError, match=r"\$MTEO_FID_WEIGHTS=.*missing"):
    comparison.CompareJobConfig(teacher="pretrained:digits")


@pytest.mark.slow
def test_standard_299_pipeline_end_to_end(tmp_path, variables):
  """The standard pipeline at 299 from a zip weights file: float samples in [-1, 1] and their uint8 form give the
  same features, twice alike; FID of the real images against their own statistics is zero; a stats file is read."""
  weights = tmp_path / fid.WEIGHTS_FILE
  write_zip_state_dict(weights, _state_with_fc(variables))
  real = np.random.default_rng(7).integers(0, 256, (4, 28, 28, 1), dtype=np.uint8)
  metric = fid.FIDMetric.from_settings(weights, real=real, cache_dir=tmp_path, progress=False)
  first = metric.network.features(real)
  assert first.shape == (4, fid.FEATURE_DIM) and np.isfinite(first).all() and np.std(first) > 0
  np.testing.assert_array_equal(metric.network.features(real.astype(np.float32) / 127.5 - 1), first)
  assert abs(metric(real)) < 1e-6 * np.trace(metric.sigma)
  generated = np.random.default_rng(8).uniform(-1, 1, (4, 28, 28, 1)).astype(np.float32)
  fid.save_stats(tmp_path / "ref.npz", metric.mu, metric.sigma)
  from_file = fid.FIDMetric.from_settings(weights, tmp_path / "ref.npz", progress=False)
  assert from_file(generated) == pytest.approx(metric(generated), rel=1e-12) and metric(generated) > 0


@pytest.mark.slow
def test_harness_rows_of_an_image_teacher_get_fid(tmp_path, variables):
  """On the digits teacher with weights and reference statistics set: the teacher and reference rows carry FID beside
  the FD of the shipped feature net, and the cached teacher row is keyed by the FID's weights and statistics."""
  weights, stats = tmp_path / "weights.npz", tmp_path / "ref.npz"
  np.savez(weights, **fid.state_dict_from_variables(variables))
  rng = np.random.default_rng(9)
  fid.save_stats(stats, *fid.metrics.gaussian_stats(rng.standard_normal((3000, fid.FEATURE_DIM))))
  config = harness.HarnessConfig(num_train=8, num_eval=4, eval_batch_size=4, teacher_steps=3, progress=False,
                                 fid_weights=str(weights), fid_stats=str(stats))
  h = harness.Harness(Teacher.load("pretrained:digits"), tmp_path / "work", config)
  teacher_row, reference_row = h.teacher_row(), h.reference_row()
  for row in (teacher_row, reference_row):
    assert np.isfinite(row["fid"]) and row["fid"] > 0 and row["fid_reference"] == str(stats)
    assert row["fd_name"] == "FD-digits"
  key = json.loads((tmp_path / "work" / harness.TEACHER_ROW_FILE).read_text())["key"]
  assert key["fid"] == h.evaluate.fid.identity
