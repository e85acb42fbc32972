"""Pictures: sample grids, 2-D scatter plots, labelled comparison grids, bar plots and (log-log) line plots.

Everything writes a PNG (or any format matplotlib/Pillow infer from the suffix) and returns nothing but the path.
Matplotlib runs with the non-interactive Agg backend so that this works on headless machines and in tests.

``save_samples_picture`` draws whatever a teacher can sample (``picture_kind`` says which picture a shape gets):

* ``[N, H, W, C]``: an image grid. C = 1 (grayscale) and C = 3 (RGB) are shown as they are; any other C (2, 4, ...:
  latents, RGBA, paired channels) shows each channel as its own grayscale tile, a sample's tiles side by side with a
  mid-grey line between them (``channels_as_tiles``), so that no channel is dropped or mistaken for a colour.
* ``[N, 1]`` (or ``[N]``): a histogram of the samples over the reference's histogram (grey).
* ``[N, 2]`` (any sample shape of 2 values): a scatter over the reference points (grey).
* ``[N, D > 2]`` (and any other shape, flattened to ``[N, D]``): a scatter of the projection onto the first two
  principal components of the reference set, titled e.g. "PCA 1-2 of 16-D".

The coordinates and axis limits of point pictures come from a ``PointView`` (``point_view``), fitted once on the
reference of a figure set and passed to every panel of it, so that all panels share one projection and one frame.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.ticker  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

PathLike = str | os.PathLike


def _check_images(images, name: str = "images") -> np.ndarray:
  images = np.asarray(images, np.float32)
  if images.ndim != 4 or min(images.shape[1:]) < 1:
    raise ValueError(f"{name} must have shape [N, H, W, C] with H, W, C >= 1, got {images.shape}")
  if images.shape[0] == 0:
    raise ValueError(f"{name} is empty")
  return images


def channels_as_tiles(images, gap: int = 1) -> np.ndarray:
  """[N, H, W, C] -> something ``image_grid`` shows as it is: C = 1 or 3 unchanged; any other C as
  [N, H, C * W + (C - 1) * gap, 1], each channel a grayscale tile, side by side, ``gap`` mid-grey columns between
  (grids pad whole samples in white, so a sample's channels stay together)."""
  images = _check_images(images)
  n, h, w, c = images.shape
  if c in (1, 3):
    return images
  tiles = np.zeros((n, h, c * w + (c - 1) * gap, 1), np.float32)  # 0.0 is mid-grey in [-1, 1]
  for k in range(c):
    tiles[:, :, k * (w + gap):k * (w + gap) + w, 0] = images[..., k]
  return tiles


def to_uint8(images) -> np.ndarray:
  """[-1, 1] floats -> [0, 255] uint8 with round-to-nearest (values outside [-1, 1] are clipped)."""
  return np.clip(np.rint((np.asarray(images, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def image_grid(images, ncol: int | None = None, padding: int = 1) -> np.ndarray:
  """[N, H, W, C] in [-1, 1] -> one uint8 picture [rows*(H+p)+p, ncol*(W+p)+p, C], white padding, row-major order
  (``ncol`` default: a roughly square grid).

  C other than 1 or 3 is first laid out as grayscale channel tiles (``channels_as_tiles``: W becomes C * W + C - 1).
  """
  images = to_uint8(channels_as_tiles(images))
  n, h, w, c = images.shape
  # Default: about square (ceil(sqrt(N)) columns for square images; fewer for wide channel strips).
  ncol = ncol or min(n, math.ceil(math.sqrt(n * (h + padding) / (w + padding))))
  if ncol < 1:
    raise ValueError(f"ncol must be positive, got {ncol}")
  nrow = math.ceil(n / ncol)
  grid = np.full((nrow * (h + padding) + padding, ncol * (w + padding) + padding, c), 255, np.uint8)
  for i, image in enumerate(images):
    top, left = padding + (i // ncol) * (h + padding), padding + (i % ncol) * (w + padding)
    grid[top:top + h, left:left + w] = image
  return grid


def save_image_grid(images, path: PathLike, ncol: int | None = None, *, scale: int = 1) -> PathLike:
  """Writes images [N, H, W, C] in [-1, 1] as one grid (``ncol`` columns, default square); ``scale`` upsamples
  every pixel to a ``scale x scale`` block (nearest) so that 8x8 digits stay visible."""
  if scale < 1:
    raise ValueError(f"scale must be a positive integer, got {scale}")
  grid = image_grid(images, ncol)
  grid = np.repeat(np.repeat(grid, scale, axis=0), scale, axis=1)
  _make_parent(path)
  Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(path)
  return path


def save_scatter(points, path: PathLike, *, reference=None, title: str | None = None,
                 limit: float | None = None) -> PathLike:
  """Scatter plot of 2-D points [N, 2] (e.g. GMM samples), optionally over ``reference`` points [M, 2] in grey;
  ``limit`` fixes both axes to [-limit, limit] so that pictures of a run are comparable."""
  return _save(scatter_figure(points, reference=reference, title=title, limit=limit), path)


def scatter_figure(points, *, reference=None, title: str | None = None, limit: float | None = None) -> plt.Figure:
  points = _check_points(points, "points")
  fig, ax = plt.subplots(figsize=(4, 4))
  if reference is not None:
    reference = _check_points(reference, "reference")
    ax.scatter(reference[:, 0], reference[:, 1], s=2.0, c="0.7", label="reference", linewidths=0)
  ax.scatter(points[:, 0], points[:, 1], s=2.0, c="C0", label="samples", linewidths=0)
  if reference is not None:
    ax.legend(loc="upper right", markerscale=4)
  if limit is not None:
    ax.set_xlim(-limit, limit)
    ax.set_ylim(-limit, limit)
  ax.set_aspect("equal")
  if title:
    ax.set_title(title)
  return fig


def _check_points(points, name: str) -> np.ndarray:
  points = np.asarray(points, np.float32)
  if points.ndim != 2 or points.shape[1] != 2:
    raise ValueError(f"{name} must have shape [N, 2], got {points.shape}")
  return points


# --- any sample array: the picture that suits its shape ---------------------------------------------------------------

def picture_kind(shape: Sequence[int]) -> str:
  """The picture ``save_samples_picture`` draws for samples of ``shape`` (leading axis: samples): "images" for
  [N, H, W, C]; else, with a sample's axes flattened to D values, "histogram" for D = 1, "scatter" for D = 2 and
  "projection" for D > 2."""
  shape = tuple(int(d) for d in shape)
  if len(shape) < 1 or shape[0] < 1 or (len(shape) > 1 and min(shape[1:]) < 1):
    raise ValueError(f"samples must have shape [N >= 1, ...] with no empty axis, got {shape}")
  if len(shape) == 4:
    return "images"
  dim = math.prod(shape[1:])
  return "histogram" if dim == 1 else "scatter" if dim == 2 else "projection"


def _as_points(samples, name: str = "samples") -> np.ndarray:
  """Samples of any non-image shape as float64 points [N, D] (a sample's axes flattened)."""
  samples = np.asarray(samples)
  kind = picture_kind(samples.shape)
  if kind == "images":
    raise ValueError(f"{name} of shape {samples.shape} are images [N, H, W, C]; draw them with save_image_grid")
  return samples.reshape(samples.shape[0], -1).astype(np.float64)


def _finite_rows(points: np.ndarray) -> np.ndarray:
  return points[np.all(np.isfinite(points), axis=1)]


def _extent(points: np.ndarray) -> float:
  """max |coordinate| over the finite values (0 for none)."""
  values = np.abs(points[np.isfinite(points)])
  return float(values.max()) if values.size else 0.0


@dataclasses.dataclass(frozen=True)
class PointView:
  """The shared frame of a set of point pictures: the coordinates drawn (the points themselves for D <= 2, else their
  projection onto the reference's first two principal components) and one axis limit, [-limit, limit]."""
  sample_shape: tuple[int, ...]           # one sample's shape, e.g. (16,)
  mean: np.ndarray | None = None          # [D], the reference mean (projections only)
  components: np.ndarray | None = None    # [D, 2], orthonormal principal directions (projections only)
  explained: tuple[float, ...] = ()       # the fraction of the reference's variance along each component
  limit: float | None = None

  @property
  def dim(self) -> int:
    return math.prod(self.sample_shape)

  @property
  def description(self) -> str:
    """E.g. "PCA 1-2 of 16-D" for a projection; empty where the points are drawn as they are."""
    if self.components is None:
      return ""
    name = f"{self.dim}-D" if len(self.sample_shape) == 1 else "x".join(map(str, self.sample_shape))
    return f"PCA 1-2 of {name}"

  def axis_labels(self) -> tuple[str, str]:
    if self.components is None:
      return ("x", "density") if self.dim == 1 else ("x1", "x2")
    return tuple(f"PC {k + 1} ({100 * e:.0f} % of variance)" for k, e in enumerate(self.explained[:2]))

  def project(self, samples) -> np.ndarray:
    """Samples [N, *sample_shape] -> the drawn coordinates [N, 1] (1-D data) or [N, 2]."""
    points = _as_points(samples)
    if points.shape[1] != self.dim:
      raise ValueError(f"samples of shape {np.shape(samples)} do not fit this view of samples of shape "
                       f"{self.sample_shape}")
    if self.components is None:
      return points
    with np.errstate(invalid="ignore", over="ignore"):  # non-finite samples stay non-finite and are not drawn
      return (points - self.mean) @ self.components


def point_view(reference, *others, spill: float = 3.0) -> PointView:
  """The ``PointView`` of a figure set: the projection (for D > 2) is fitted on ``reference`` only; the limit frames
  the reference, widened up to ``spill`` times for the ``others`` (samples that spill over), so that outliers show
  without shrinking the modes to a dot. Non-finite values are left out of the fit and the frame."""
  points = _as_points(reference, "reference")
  sample_shape = tuple(np.shape(reference)[1:]) or (1,)
  mean = components = None
  explained: tuple[float, ...] = ()
  if points.shape[1] > 2:
    finite = _finite_rows(points)
    if finite.shape[0] == 0:
      raise ValueError("reference has no finite sample to fit a projection on")
    mean = finite.mean(axis=0)
    _, singular, vt = np.linalg.svd(finite - mean, full_matrices=True)
    components = vt[:2].T.copy()                                    # [D, 2]
    # A fixed sign per component (largest loading positive), so that reruns and panels agree.
    components *= np.where(components[np.argmax(np.abs(components), axis=0), [0, 1]] < 0, -1.0, 1.0)
    variance = np.zeros(points.shape[1])
    variance[:singular.shape[0]] = singular ** 2
    total = variance.sum()
    explained = tuple(float(v / total) if total > 0 else 0.0 for v in variance[:2])
  view = PointView(sample_shape, mean, components, explained)
  reference_extent = _extent(view.project(reference))
  other_extent = max([_extent(view.project(o)) for o in others if o is not None] + [0.0])
  if reference_extent > 0:
    limit = 1.1 * min(max(reference_extent, other_extent), spill * reference_extent)
  else:
    limit = 1.1 * other_extent if other_extent > 0 else None
  return dataclasses.replace(view, limit=limit)


def samples_figure(samples, *, reference=None, view: PointView | None = None, title: str | None = None) -> plt.Figure:
  """The figure of point samples of any non-image shape (``picture_kind``: histogram, scatter or projection) over
  ``reference`` in grey; ``view`` (default: ``point_view(reference or samples, samples)``) fixes the frame."""
  if view is None:
    view = point_view(samples if reference is None else reference, samples)
  x = view.project(samples)
  ref = None if reference is None else view.project(reference)
  full_title = " - ".join(t for t in (title, view.description) if t) or None
  xlabel, ylabel = view.axis_labels()
  if x.shape[1] == 2:
    fig = scatter_figure(x, reference=ref, title=full_title, limit=view.limit)
    fig.axes[0].set_xlabel(xlabel)
    fig.axes[0].set_ylabel(ylabel)
    return fig
  # 1-D: histograms on shared bins over the view's frame.
  fig, ax = plt.subplots(figsize=(4.5, 3))
  limit = view.limit
  if limit is None:
    limit = max(_extent(x), _extent(ref) if ref is not None else 0.0) or 1.0
  count = (ref if ref is not None else x).shape[0]
  bins = np.linspace(-limit, limit, int(np.clip(round(2 * math.sqrt(count)), 10, 60)) + 1)
  if ref is not None:
    ax.hist(_finite_rows(ref)[:, 0], bins=bins, density=True, color="0.75", label="reference")
  ax.hist(_finite_rows(x)[:, 0], bins=bins, density=True, histtype="step", color="C0", linewidth=1.5,
          label="samples")
  ax.set_xlim(-limit, limit)
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  if ref is not None:
    ax.legend(loc="upper right")
  if full_title:
    ax.set_title(full_title)
  fig.tight_layout()
  return fig


def save_samples_picture(samples, path: PathLike, *, reference=None, view: PointView | None = None,
                         title: str | None = None, scale: int | None = None, ncol: int | None = None) -> PathLike:
  """The picture that suits ``samples`` (see ``picture_kind`` and the module docstring): an image grid for
  [N, H, W, C] (``reference``, ``view`` and ``title`` unused; ``scale`` defaults to ``max(1, 32 // H)`` so that small
  images stay visible), else ``samples_figure``."""
  samples = np.asarray(samples)
  if picture_kind(samples.shape) == "images":
    return save_image_grid(samples, path, ncol, scale=scale or max(1, 32 // max(1, samples.shape[1])))
  return _save(samples_figure(samples, reference=reference, view=view, title=title), path)


def save_comparison_grid(rows: Mapping[str, object], path: PathLike, *, title: str | None = None,
                         scale: float = 1.0) -> PathLike:
  """One labelled row per entry of ``rows`` ({name: images [N, H, W, C] in [-1, 1]}), column j of every row from the
  same initial noise (teacher vs base solver vs MTEO). All rows need the same N, H, W, C."""
  if not rows:
    raise ValueError("rows is empty; expected {name: images [N, H, W, C]}")
  arrays = {name: _check_images(images, f"rows[{name!r}]") for name, images in rows.items()}
  shapes = {name: a.shape for name, a in arrays.items()}
  if len(set(shapes.values())) != 1:
    raise ValueError(f"every row needs the same shape [N, H, W, C] (one column per noise), got {shapes}")
  arrays = {name: channels_as_tiles(a) for name, a in arrays.items()}  # C not 1 or 3: one tile per channel
  n = next(iter(arrays.values())).shape[0]
  strips = [image_grid(a, ncol=n) for a in arrays.values()]
  # Size the figure so that every strip keeps its aspect ratio: about 0.7 inch per picture, 1.5 inch for labels.
  fig_width = scale * min(16.0, 1.5 + 0.7 * n)
  row_height = (fig_width - 1.5 * scale) * strips[0].shape[0] / strips[0].shape[1]
  fig, axes = plt.subplots(len(strips), 1, squeeze=False,
                           figsize=(fig_width, len(strips) * row_height + (0.5 if title else 0.2)))
  for ax, name, strip in zip(axes[:, 0], arrays, strips):
    ax.imshow(strip[..., 0] if strip.shape[-1] == 1 else strip, cmap="gray", vmin=0, vmax=255,
              interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_ylabel(name, rotation=0, ha="right", va="center")
  if title:
    fig.suptitle(title)
  return _save(fig, path)


def save_bar_plot(values: Mapping[str, float], path: PathLike, *, errors: Mapping[str, float] | None = None,
                  ylabel: str = "", title: str | None = None, log_y: bool = False) -> PathLike:
  """Bars of ``values`` ({label: value}) in the given order, optional error bars ``errors`` ({label: +-error})."""
  figure = bar_plot_figure(values, errors=errors, ylabel=ylabel, title=title, log_y=log_y)
  return _save(figure, path)


def bar_plot_figure(values: Mapping[str, float], *, errors: Mapping[str, float] | None = None, ylabel: str = "",
                    title: str | None = None, log_y: bool = False) -> plt.Figure:
  if not values:
    raise ValueError("values is empty; expected {label: value}")
  labels, heights = list(values), [float(v) for v in values.values()]
  if log_y and min(heights) <= 0:
    raise ValueError(f"log_y needs positive values, got {dict(zip(labels, heights))}")
  yerr = None
  if errors is not None:
    missing = set(labels) - set(errors)
    if missing:
      raise ValueError(f"errors lacks the labels {sorted(missing)}")
    yerr = [float(errors[k]) for k in labels]
  fig, ax = plt.subplots(figsize=(max(3.0, 0.6 * len(labels) + 1.5), 3.5))
  ax.bar(range(len(labels)), heights, yerr=yerr, color=[f"C{i % 10}" for i in range(len(labels))], capsize=3)
  ax.set_xticks(range(len(labels)), labels, rotation=30 if len(labels) > 4 else 0, ha="right" if len(labels) > 4
                else "center")
  if log_y:
    ax.set_yscale("log")
  ax.set_ylabel(ylabel)
  if title:
    ax.set_title(title)
  fig.tight_layout()
  return fig


def save_grouped_bar_plot(groups: Mapping[str, Mapping[str, float]], path: PathLike, *, ylabel: str = "",
                          title: str | None = None) -> PathLike:
  """Bars grouped along x (``{group: {series: value}}``, e.g. {solver: {"base": rmse, "mteo": rmse}}), one colour
  and legend entry per series; a series missing from a group leaves a gap."""
  return _save(grouped_bar_plot_figure(groups, ylabel=ylabel, title=title), path)


def grouped_bar_plot_figure(groups: Mapping[str, Mapping[str, float]], *, ylabel: str = "",
                            title: str | None = None) -> plt.Figure:
  if not groups or not all(groups.values()):
    raise ValueError("groups must be a non-empty {group: {series: value}} with a non-empty mapping per group")
  series = list(dict.fromkeys(name for values in groups.values() for name in values))
  width = 0.8 / len(series)
  fig, ax = plt.subplots(figsize=(max(3.5, 0.5 * len(groups) * len(series) + 1.5), 3.5))
  for k, name in enumerate(series):
    positions = [g + (k - (len(series) - 1) / 2) * width for g, values in enumerate(groups.values()) if name in values]
    heights = [float(values[name]) for values in groups.values() if name in values]
    ax.bar(positions, heights, width, label=name, color=f"C{k % 10}")
  ax.set_xticks(range(len(groups)), list(groups))
  ax.set_ylabel(ylabel)
  ax.legend()
  if title:
    ax.set_title(title)
  fig.tight_layout()
  return fig


def save_line_plot(curves: Mapping[str, tuple[Sequence[float], Sequence[float]]], path: PathLike, *,
                   xlabel: str = "", ylabel: str = "", title: str | None = None, log_x: bool = True,
                   log_y: bool = True) -> PathLike:
  """Lines ({label: (x, y)}) with markers; log-log by default (error vs NFE, order of convergence)."""
  return _save(line_plot_figure(curves, xlabel=xlabel, ylabel=ylabel, title=title, log_x=log_x, log_y=log_y), path)


def line_plot_figure(curves: Mapping[str, tuple[Sequence[float], Sequence[float]]], *, xlabel: str = "",
                     ylabel: str = "", title: str | None = None, log_x: bool = True,
                     log_y: bool = True) -> plt.Figure:
  if not curves:
    raise ValueError("curves is empty; expected {label: (x, y)}")
  fig, ax = plt.subplots(figsize=(4.5, 3.5))
  for label, (x, y) in curves.items():
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.shape != y.shape or x.ndim != 1:
      raise ValueError(f"curve {label!r} needs 1-D x and y of equal length, got {x.shape} and {y.shape}")
    for axis, values, log in (("x", x, log_x), ("y", y, log_y)):
      if log and np.any(values <= 0):
        raise ValueError(f"curve {label!r} has non-positive {axis} values; a log {axis} axis needs positive values "
                         f"(pass log_{axis}=False)")
    ax.plot(x, y, marker="o", markersize=3, label=label)
  ax.set_xscale("log" if log_x else "linear")
  ax.set_yscale("log" if log_y else "linear")
  ticks = np.unique(np.concatenate([np.asarray(x, np.float64) for x, _ in curves.values()]))
  if log_x and len(ticks) <= 12:
    # A few x values such as NFE 3, 5, 9: label them plainly instead of as powers of ten.
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.grid(True, which="both", alpha=0.3)
  ax.legend()
  if title:
    ax.set_title(title)
  fig.tight_layout()
  return fig


def _make_parent(path: PathLike) -> None:
  parent = os.path.dirname(os.fspath(path))
  if parent:
    os.makedirs(parent, exist_ok=True)


def _save(fig: plt.Figure, path: PathLike) -> PathLike:
  _make_parent(path)
  try:
    fig.savefig(path, dpi=120, bbox_inches="tight")
  finally:
    plt.close(fig)  # figures are global state in pyplot; leaking them grows memory over a long run
  return path
