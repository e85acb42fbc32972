"""One picture for any sample array: histograms (1-D), scatters (2-D), shared PCA projections (D > 2) and image grids of
any channel count; and the teacher-training pictures use it."""

import numpy as np
import pytest
from PIL import Image

from mteo_jax import train, viz


def _points(n, shape, seed=0):
  return np.random.default_rng(seed).normal(size=(n,) + shape).astype(np.float32)


@pytest.mark.parametrize("shape, kind", [
    ((5,), "histogram"), ((5, 1), "histogram"), ((5, 2), "scatter"), ((5, 3), "projection"),
    ((5, 16), "projection"), ((5, 4, 5), "projection"), ((5, 2, 2, 2, 2), "projection"),
    ((5, 8, 8, 1), "images"), ((5, 8, 8, 3), "images"), ((5, 8, 8, 2), "images"), ((5, 8, 8, 4), "images")])
def test_picture_kind_of_every_shape(shape, kind):
  assert viz.picture_kind(shape) == kind


def test_picture_kind_refuses_empty_samples():
  for shape in ((), (0, 2), (3, 0)):
    with pytest.raises(ValueError, match=r"\[N >= 1"):
      viz.picture_kind(shape)


@pytest.mark.parametrize("shape, description", [
    ((), ""), ((1,), ""), ((2,), ""), ((3,), "PCA 1-2 of 3-D"), ((16,), "PCA 1-2 of 16-D"), ((4, 5), "PCA 1-2 of 4x5")])
def test_point_samples_of_every_dimension_get_a_picture(tmp_path, shape, description):
  samples, reference = _points(300, shape, seed=1), _points(500, shape, seed=2)
  samples.reshape(300, -1)[:2] = [[np.nan], [np.inf]]   # diverged samples are left out, not an error
  path = viz.save_samples_picture(samples, tmp_path / "p.png", reference=reference, title="euler")
  with Image.open(path) as image:
    assert image.format == "PNG" and min(image.size) > 100
  figure = viz.samples_figure(samples, reference=reference, title="euler")
  ax = figure.axes[0]
  assert ax.get_title() == " - ".join(t for t in ("euler", description) if t)
  if max(1, int(np.prod(shape))) == 1:   # a histogram of the samples over the reference's, on the same bins
    assert ax.get_ylabel() == "density" and len(ax.patches) > 10
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["reference", "samples"]
  else:                                  # a scatter: reference (grey), then samples
    assert len(ax.collections) == 2 and ax.collections[1].get_offsets().shape == (300, 2)
    assert ax.get_xlim() == ax.get_ylim()
  if description:
    assert ax.get_xlabel().startswith("PC 1 (") and ax.get_ylabel().startswith("PC 2 (")
  viz.plt.close("all")


def test_projection_is_fitted_on_the_reference_and_shared_by_every_panel():
  a, b = np.meshgrid(np.linspace(-2, 2, 20), np.linspace(-1, 1, 20))   # uncorrelated, exactly
  reference = np.zeros((400, 16))
  reference[:, 3], reference[:, 7] = a.ravel(), b.ravel()   # the largest spread along x3, the second along x7
  reference += 5.0                                   # off-centre: the projection centres on the reference mean
  far = reference[:50].copy()
  far[0, 3] = 1e3                                    # an outlier, widened up to 3x only
  far[1] = np.nan                                    # non-finite samples are neither fitted nor framed
  view = viz.point_view(reference, reference[:100], far)
  assert view.description == "PCA 1-2 of 16-D" and view.components.shape == (16, 2)
  np.testing.assert_allclose(np.abs(view.components[[3, 7]]), np.eye(2), atol=1e-9)
  assert view.explained[0] > view.explained[1] > 0.15 and sum(view.explained) == pytest.approx(1.0)
  projected = view.project(reference)
  np.testing.assert_allclose(projected.mean(axis=0), 0.0, atol=1e-9)
  reference_extent = np.abs(projected).max()
  assert view.limit == pytest.approx(1.1 * 3.0 * reference_extent)
  # The same view for every panel: equal coordinates for equal samples, whatever else is drawn.
  np.testing.assert_array_equal(view.project(reference[:10]), projected[:10])
  assert viz.point_view(reference).limit == pytest.approx(1.1 * reference_extent)
  # Deterministic signs: a refit on a permuted reference gives the same components.
  again = viz.point_view(reference[::-1])
  np.testing.assert_allclose(again.components, view.components, atol=1e-9)
  with pytest.raises(ValueError, match="do not fit this view"):
    view.project(np.zeros((3, 8)))
  with pytest.raises(ValueError, match="no finite sample"):
    viz.point_view(np.full((4, 5), np.nan))
  with pytest.raises(ValueError, match="images"):
    viz.point_view(np.zeros((4, 8, 8, 1)))
  # 1-D and 2-D points are drawn as they are.
  assert viz.point_view(np.ones((4, 2))).components is None and viz.point_view(np.ones((4, 1))).description == ""


@pytest.mark.parametrize("channels", [1, 2, 3, 4])
def test_images_of_any_channel_count(tmp_path, channels):
  images = np.random.default_rng(0).uniform(-1, 1, size=(5, 6, 7, channels)).astype(np.float32)
  tiles = viz.channels_as_tiles(images)
  if channels in (1, 3):
    assert tiles is images or np.array_equal(tiles, images)
  else:   # each channel its own grayscale tile, a mid-grey column between them
    assert tiles.shape == (5, 6, channels * 7 + channels - 1, 1)
    for k in range(channels):
      np.testing.assert_array_equal(tiles[..., k * 8:k * 8 + 7, 0], images[..., k])
    assert np.all(tiles[:, :, 7, 0] == 0.0)
  path = viz.save_samples_picture(images, tmp_path / "grid.png")
  with Image.open(path) as image:
    assert image.mode == ("RGB" if channels == 3 else "L")
    assert image.size[1] >= 4 * 6   # small images are upscaled (scale = 32 // H = 5)
  comparison = viz.save_comparison_grid({"reference": images, "euler": images}, tmp_path / "c.png", title="NFE 3")
  with Image.open(comparison) as image:
    assert image.size[0] > 100


def test_teacher_training_pictures_of_every_shape(tmp_path, monkeypatch):
  for name, shape in (("d1", (1,)), ("d3", (3,)), ("d16", (16,))):
    assert train.save_samples(_points(64, shape), tmp_path / f"{name}.png", reference=_points(200, shape, 1)) \
        == tmp_path / f"{name}.png"
    assert Image.open(tmp_path / f"{name}.png").size[0] > 100
  assert train.save_samples(_points(4, (8, 8, 2)), tmp_path / "c2.png") is not None
  # A picture that cannot be drawn is logged and skipped, never raised into the training loop.
  monkeypatch.setattr(viz, "save_samples_picture", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("no fonts")))
  assert train.save_samples(_points(64, (2,)), tmp_path / "broken.png") is None
  assert not (tmp_path / "broken.png").exists()
