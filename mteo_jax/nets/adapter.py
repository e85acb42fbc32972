"""Any Flax Linen model as a ``Backbone`` (DESIGN §3, "Any Flax model"), without rewriting it.

``LinenBackbone`` takes a Linen module written for another code base and its parameters, and splits its forward pass
at the time embedding with ``flax.linen.intercept_methods``. The user names the submodule (or method) that *produces*
the time embedding; the *conditioned layers* are then its consumers: every submodule call that receives the embedding,
or something computed from it alone, as an input (each residual block's time projection, each adaLN modulation, a
conditioned output layer). Each consumer gets its own leaf, and that leaf is the consumer's input:

    temb = backbone.embed_time(params, c_noise)  # {"down1/time_proj": [B, D], ...}: what each consumer receives
    out = backbone.body(params, x, temb)         # the model with each consumer's input replaced by temb[layer]
    # == module.apply({"params": params}, x, c_noise), bit for bit, eagerly and under jit

so an MTEO table learns, per evaluation, exactly what every conditioned layer sees. The result is a ``Backbone``:
``make_denoiser``, ``mteo.init_table``, ``mteo.student_sample``, ``mteo.make_loss_fn`` and the solvers'
``temb_table`` take it as they take the built-in ``MLP`` and ``UNet``.

Worked example (a third-party UNet whose ``__call__(self, x, t)`` builds ``TimestepEmbedder(name="time_net")`` and
gives its output to every ``ResnetBlock``, which projects it with ``nn.Dense(ch, name="time_proj")``)::

    from mteo_jax import Preconditioning, get_schedule, get_solver, make_denoiser, mteo
    from mteo_jax.nets.adapter import LinenBackbone

    backbone = LinenBackbone(MyUNet(), (32, 32, 3), time_embedding="time_net")
    backbone.layer_names   # ('down1/time_proj', 'down2/time_proj', 'mid/time_proj', 'up1/time_proj')
    precond = Preconditioning("edm", sigma_data=0.5)   # the model is fed c_noise = log(sigma) / 4
    denoiser = make_denoiser(backbone, params, precond)  # params: the model's "params" collection
    solver = get_solver("dpmpp_2m")
    sigmas = get_schedule("edm", solver.num_steps_for_nfe(3), 0.002, 80.0, rho=7.0)
    table = mteo.init_table(backbone, params, precond, solver.eval_sigmas(sigmas))  # reproduces the base solver
    table, result = mteo.fit_table(backbone, params, precond, solver, sigmas, run_dir="runs/my_unet")  # trained
    x0 = mteo.student_sample(solver, backbone, params, precond, table, x_T, sigmas)

A model that takes another noise input or more arguments gets a ``call``, e.g. one trained on ``sigma`` with a
``train`` flag: ``call=lambda module, x, c_noise: module(x, jnp.exp(4.0 * c_noise), train=False)``.

What is checked when the backbone is built (by tracing the model once, on abstract inputs, and following the data
flow through its jaxpr), each a ``ValueError`` that says what to change:

* ``time_embedding`` names something that runs in a forward pass (else the message lists every called submodule);
* each conditioned layer receives an input computed from the time embedding without the data ``x``;
* the output depends on the noise level only through the conditioned layers: nothing else reads the noise input or
  the time embedding, so ``body`` sees the noise level only through ``temb``;
* the model's output has the shape of its input, and its only variables are parameters.

Limits: unconditional models only (a label embedding mixed into the conditioned layers' inputs cannot be taken back
out of them; ``num_classes > 0`` raises ``NotImplementedError`` with the way round); inference mode only (no dropout
or batch statistics); the producer and the conditioned layers must not sit inside a lifted transform (``nn.scan``,
``nn.remat``, ``nn.vmap``), whose intermediate values the interceptor cannot hand out; Flax NNX modules are refused
(``TypeError``), as ``intercept_methods`` sees Linen submodules only.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
import operator
import re
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.extend import core as jax_core

from mteo_jax.nets.backbone import Backbone, Params, TimeEmb

Call = Callable[[nn.Module, jax.Array, jax.Array], Any]
CallKey = tuple[tuple[str, ...], str, int]  # (submodule path, method name, occurrence in the forward pass)

# Dependence bits of a value in the traced forward pass.
_ON_X, _ON_C_NOISE, _ON_TEMB = 1, 2, 4
# Batch size of the abstract forward passes that analyse the model (> 1, so that a batch axis can be told apart).
_ANALYSIS_BATCH = 2
# Higher-order primitives whose sub-jaxpr maps its inputs to its outputs one to one; the data flow is followed into
# them. Any other primitive (scan, while, cond, ...) counts every output as depending on every input: conservative.
_TRANSPARENT_PRIMITIVES = frozenset({"jit", "pjit", "closed_call", "core_call", "remat", "remat2", "checkpoint",
                                     "custom_jvp_call", "custom_vjp_call", "custom_vjp_call_jaxpr"})
_MAX_LISTED = 60


def default_call(module: nn.Module, x: jax.Array, c_noise: jax.Array) -> Any:
  """``module(x, c_noise)``: the model takes the sample and the library's noise input, in that order."""
  return module(x, c_noise)


@dataclasses.dataclass(frozen=True)
class _Site:
  """Where one leaf enters: argument leaf ``arg_index`` of the flattened ``(args, kwargs)`` of call ``key``, of shape
  ``[B, *trailing_shape]``; its leaf in ``temb`` is that input reshaped to ``[B, prod(trailing_shape)]``."""
  name: str
  key: CallKey
  arg_index: int
  trailing_shape: tuple[int, ...]

  @property
  def width(self) -> int:
    return math.prod(self.trailing_shape)


@dataclasses.dataclass(frozen=True)
class _Record:
  """One submodule call seen during an analysis pass, outside the producers."""
  key: CallKey
  ancestors: tuple[CallKey, ...]
  arrays: tuple[tuple[int, Any], ...]  # (index in the flattened (args, kwargs), array) for every array argument


class _Stop(Exception):
  """Raised by ``time_embedding`` once every conditioned layer's input is captured: the rest need not run."""


def _display(path: tuple[str, ...], method: str) -> str:
  name = "/".join(path)
  return name if method == "__call__" else (f"{name}.{method}" if name else method)


def _call_name(key: CallKey, repeated: bool) -> str:
  path, method, occurrence = key
  return _display(path, method) + (f"#{occurrence + 1}" if repeated else "")


def _names_to_match(path: tuple[str, ...], method: str) -> tuple[str, ...]:
  """A pattern names a call by its full path (``down1/time_proj``) or by its own name (``time_proj``); a method other
  than ``__call__`` as ``path.method`` or ``name.method`` (``method`` alone on the top-level module)."""
  if method == "__call__":
    return ("/".join(path), path[-1]) if path else ()
  return (_display(path, method), f"{path[-1]}.{method}") if path else (method,)


def _compile_patterns(what: str, patterns: str | Sequence[str]) -> tuple[re.Pattern, ...]:
  if isinstance(patterns, str):
    patterns = (patterns,)
  patterns = tuple(patterns)
  if not patterns or not all(isinstance(p, str) and p for p in patterns):
    raise ValueError(f"{what} must be a non-empty string or sequence of strings (submodule paths, names or regular "
                     f"expressions), got {patterns!r}")
  compiled = []
  for pattern in patterns:
    try:
      compiled.append(re.compile(pattern))
    except re.error as e:
      raise ValueError(f"{what}: {pattern!r} is not a valid regular expression ({e})") from None
  return tuple(compiled)


def _matches(patterns: Sequence[re.Pattern], path: tuple[str, ...], method: str) -> bool:
  return any(p.fullmatch(name) for p in patterns for name in _names_to_match(path, method))


def _listing(names: Sequence[str]) -> str:
  unique = list(dict.fromkeys(names))
  shown = ", ".join(unique[:_MAX_LISTED])
  return shown + (f", ... ({len(unique) - _MAX_LISTED} more)" if len(unique) > _MAX_LISTED else "")


def _is_array(leaf: Any) -> bool:
  return isinstance(leaf, jax.Array)


class _Interceptor:
  """Walks the submodule calls of one forward pass: producers go to ``on_producer``, every other call (outside the
  producers, not ``setup``, not the model's own ``__call__``) to ``on_call``, each with its ``CallKey``."""

  def __init__(self, producers: Sequence[re.Pattern], on_producer: Callable, on_call: Callable):
    self.producers, self.on_producer, self.on_call = producers, on_producer, on_call
    self.counts: collections.Counter = collections.Counter()
    self.stack: list[CallKey] = []
    self.inside_producer = 0
    self.seen: list[str] = []  # every call, for error messages

  def __call__(self, next_fun, args, kwargs, context):
    method = context.method_name
    if method == "setup":
      return next_fun(*args, **kwargs)
    path = tuple(context.module.path)
    self.seen.append(_display(path, method) or f"<{type(context.module).__name__}>")
    if self.inside_producer or (not path and method == "__call__"):
      return next_fun(*args, **kwargs)
    key = (path, method, self.counts[path, method])
    self.counts[path, method] += 1
    if _matches(self.producers, path, method):
      self.inside_producer += 1
      try:
        return self.on_producer(key, next_fun, args, kwargs)
      finally:
        self.inside_producer -= 1
    ancestors = tuple(self.stack)
    self.stack.append(key)
    try:
      return self.on_call(key, ancestors, next_fun, args, kwargs)
    finally:
      self.stack.pop()


def _passthrough_producer(key, next_fun, args, kwargs):
  del key
  return next_fun(*args, **kwargs)


def _sub_jaxpr(eqn) -> Any:
  """The sub-jaxpr of a transparent higher-order primitive whose inputs and outputs match the equation's, or None."""
  if eqn.primitive.name not in _TRANSPARENT_PRIMITIVES:
    return None
  inner = [v.jaxpr if isinstance(v, jax_core.ClosedJaxpr) else v for v in eqn.params.values()
           if isinstance(v, (jax_core.ClosedJaxpr, jax_core.Jaxpr))]
  if len(inner) != 1 or len(inner[0].invars) != len(eqn.invars) or len(inner[0].outvars) != len(eqn.outvars):
    return None
  return inner[0]


def _dependence(jaxpr: Any, in_masks: Sequence[int]) -> list[int]:
  """For each output of ``jaxpr``, the OR of the masks of the inputs it depends on (a sound over-approximation)."""
  masks: dict[int, int] = {}  # id(Var) -> mask; the jaxpr keeps every Var alive, so ids are unique
  for var, mask in zip(jaxpr.invars, in_masks):
    masks[id(var)] = mask

  def mask_of(var):
    return 0 if isinstance(var, jax_core.Literal) else masks.get(id(var), 0)

  for eqn in jaxpr.eqns:
    ins = [mask_of(v) for v in eqn.invars]
    inner = _sub_jaxpr(eqn)
    if inner is not None:
      outs = _dependence(inner, ins)
    else:
      outs = [functools.reduce(operator.or_, ins, 0)] * len(eqn.outvars)
    for var, mask in zip(eqn.outvars, outs):
      masks[id(var)] = mask
  return [mask_of(v) for v in jaxpr.outvars]


def _trace_masks(fn: Callable, args: Sequence[Any], arg_masks: Sequence[int]) -> tuple[list[int], Any]:
  """Traces ``fn(*args)`` (abstract arguments): the dependence mask of every leaf of its flat output, and its shape."""
  try:
    closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(*args)
  except jax.errors.UnexpectedTracerError as e:
    raise ValueError("the time embedding or a conditioned layer runs inside a lifted transform (nn.scan, nn.remat, "
                     "nn.vmap), whose intermediate values cannot be taken out; LinenBackbone needs them to run in "
                     f"the model's own trace ({e})") from None
  in_masks = [mask for arg, mask in zip(args, arg_masks) for _ in jax.tree.leaves(arg)]
  return _dependence(closed.jaxpr, in_masks), out_shape


class LinenBackbone(Backbone):
  """A third-party Flax Linen model as a ``Backbone``: its forward pass split at the inputs of its conditioned layers.

  Args:
    module: an unbound ``flax.linen.Module`` (the model as written elsewhere, not rewritten).
    data_shape: the shape of one sample, e.g. ``(32, 32, 3)``; the model must map ``x`` [B, *data_shape] to an
      output of the same shape.
    time_embedding: the submodule(s) or method(s) whose *output* is the time embedding, by path (``"time_net"``,
      ``"encoder/temb"``), own name, or regular expression matched in full (``r"t_embed\\d"``); a method other than
      ``__call__`` as ``"path.method"`` (``"embed_t"`` for a method of the top-level module). Every call of a match
      is a producer; what runs inside it is left alone.
    conditioned_layers: None (default): every *innermost* submodule call that receives, as an array argument,
      something computed from the time embedding and not from ``x`` (e.g. each block's ``time_proj`` Dense, not the
      block around it). Or patterns as for ``time_embedding`` choosing the consumers yourself, e.g. the blocks
      (``r"down\\d|mid|up\\d"``) to place the leaves before their activation; each must receive such an input, none
      may contain another, and together they must carry every use of the time embedding.
    call: ``call(module, x, c_noise) -> output``, run as a method of the bound model: how to call it with the sample
      ``x`` [B, *data_shape] and the library's noise input ``c_noise`` [B] (``Preconditioning.c_noise(sigma)``, e.g.
      ``log(sigma) / 4`` for EDM). Default ``module(x, c_noise)``. Convert here when the model was trained on another
      noise input, and pass fixed arguments (``train=False``).
    num_classes: must be 0; class-conditional models are not supported (``NotImplementedError`` says why).

  Attributes:
    layer_names: one name per conditioned-layer input, in call order: the call's path (``"down1/time_proj"``),
      ``"#k"`` appended when a submodule is called more than once, ``"[i]"`` when one call receives several.
    emb_dim: the common width D of the leaves, or None when the layers receive inputs of different widths.
    module, data_shape, num_classes: as given (``num_classes`` is 0).

  Leaves are ``[B, D]``: an input of shape ``[B, *rest]`` is flattened to ``D = prod(rest)`` and restored in ``body``.
  The ``"shared"`` MTEO granularity uses the first layer's leaf for all, so it needs every layer to receive the same
  embedding of the same width (true when the consumers take the shared embedding unchanged).

  Raises:
    TypeError: ``module`` is not a Linen module (a Flax NNX module gets a message saying how to wrap it).
    NotImplementedError: ``num_classes > 0``.
    ValueError: a bad ``data_shape`` or pattern; ``time_embedding`` or ``conditioned_layers`` matching nothing that
      runs (the message lists every submodule called in a forward pass); a conditioned layer whose input does not
      carry the time embedding or mixes it with ``x``; an output that depends on the noise level other than through
      the conditioned layers; an output whose shape is not ``data_shape``; variables other than parameters.
  """

  #: The noise input that ``body`` hands the model. Nothing it feeds reaches the output (checked when the backbone
  #: is built): every conditioned layer's input is replaced by its ``temb`` leaf.
  placeholder_c_noise: float = 0.0

  def __init__(self, module: nn.Module, data_shape: tuple[int, ...], *, time_embedding: str | Sequence[str],
               conditioned_layers: str | Sequence[str] | None = None, call: Call | None = None,
               num_classes: int = 0):
    if not isinstance(module, nn.Module):
      try:
        from flax import nnx  # noqa: PLC0415 (only needed for this message)
        is_nnx = isinstance(module, nnx.Module)
      except ImportError:
        is_nnx = False
      if is_nnx:
        raise TypeError(
            f"LinenBackbone takes a flax.linen Module, got the Flax NNX module {type(module).__name__}. It finds the "
            "time embedding with flax.linen.intercept_methods, which sees Linen submodules only, so an NNX model "
            "wrapped whole by flax.nnx.bridge.to_linen stays opaque. Write the model, or a Linen wrapper whose time "
            "embedding and conditioned layers are Linen submodules (each may be an NNX part wrapped by "
            "nnx.bridge.to_linen), or subclass mteo_jax.nets.embeddings.LiftedTimeEmbedding") from None
      raise TypeError(f"LinenBackbone takes a flax.linen Module, got {type(module).__name__}")
    if num_classes:
      raise NotImplementedError(
          f"LinenBackbone supports unconditional models only (got num_classes={num_classes}). Its leaves are the "
          "inputs of the conditioned layers, where a class embedding is already mixed with the time embedding (and "
          "usually passed through a nonlinearity), so the time part that an MTEO table replaces cannot be taken "
          "out there. For a class-conditional model, subclass mteo_jax.nets.embeddings.LiftedTimeEmbedding: reuse "
          "the model's submodules under the same names (so its parameters load unchanged) and split its __call__ "
          "into time_embedding, label_embedding (added to the time part) and body")
    self.module = module
    try:
      self.data_shape = tuple(int(d) for d in data_shape)
    except (TypeError, ValueError):
      raise ValueError(f"data_shape must be a tuple of positive integers, got {data_shape!r}") from None
    if not self.data_shape or min(self.data_shape) < 1:
      raise ValueError(f"data_shape must be a non-empty tuple of positive integers, got {data_shape!r}")
    self.num_classes = 0
    self._call = call if call is not None else default_call
    self._producers = _compile_patterns("time_embedding", time_embedding)
    self._consumers = None if conditioned_layers is None else _compile_patterns("conditioned_layers",
                                                                                conditioned_layers)
    self._sites = self._find_sites()
    self._sites_by_key: dict[CallKey, list[_Site]] = collections.defaultdict(list)
    for site in self._sites:
      self._sites_by_key[site.key].append(site)
    self.layer_names: tuple[str, ...] = tuple(site.name for site in self._sites)
    widths = {site.width for site in self._sites}
    self.emb_dim: int | None = widths.pop() if len(widths) == 1 else None

  # --- analysis (once, on abstract inputs) -----------------------------------------------------------------------

  def _describe(self) -> str:
    return f"{type(self.module).__name__} (data shape {self.data_shape})"

  def _forward(self, variables: Any, x: jax.Array, c_noise: jax.Array, interceptor: _Interceptor) -> Any:
    with nn.intercept_methods(interceptor):
      return self.module.apply(variables, x, c_noise, method=self._call)

  def _find_sites(self) -> tuple[_Site, ...]:
    batch = _ANALYSIS_BATCH
    x = jax.ShapeDtypeStruct((batch,) + self.data_shape, jnp.float32)
    c_noise = jax.ShapeDtypeStruct((batch,), jnp.float32)

    # Pass 1: abstract parameters, and the shapes of the producers' outputs.
    produced: list[tuple[CallKey, Any]] = []

    def record_producer(key, next_fun, args, kwargs):
      out = next_fun(*args, **kwargs)
      produced.append((key, jax.tree.map(lambda a: jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a)), out)))
      return out

    walker = _Interceptor(self._producers, record_producer, lambda key, anc, next_fun, a, k: next_fun(*a, **k))
    with nn.intercept_methods(walker):
      variables = jax.eval_shape(lambda x, c: self.module.init({"params": jax.random.key(0)}, x, c,
                                                               method=self._call), x, c_noise)
    called = walker.seen
    others = sorted(set(variables) - {"params"})
    if others:
      raise ValueError(f"{self._describe()} has variables other than parameters ({others}); LinenBackbone runs "
                       "models whose only variables are their 'params' collection")
    params = variables.get("params", {})
    if not produced:
      raise ValueError(f"time_embedding {[p.pattern for p in self._producers]} matches no submodule or method "
                       f"called in a forward pass of {self._describe()}; called: {_listing(called)}")
    producer_keys = [key for key, _ in produced]
    embeddings = [shape for _, shape in produced]

    def replace_producers(expected_keys, values):
      queue = list(zip(expected_keys, values))

      def on_producer(key, next_fun, args, kwargs):
        del next_fun, args, kwargs  # the producer's output is an input of the traced function instead
        expected, value = queue.pop(0) if queue else (None, None)
        if key != expected:
          raise ValueError(f"{self._describe()} calls its time embedding differently from one forward pass to the "
                           f"next ({_display(*key[:2])} where {expected and _display(*expected[:2])} was expected)")
        return value
      return on_producer

    # Pass 2: every call outside the producers, with the dependence of each array argument on x, c_noise, temb.
    records: list[_Record] = []

    def analysed(params, x, c_noise, embeddings):
      records.clear()

      def on_call(key, ancestors, next_fun, args, kwargs):
        leaves = jax.tree.leaves((args, kwargs))
        records.append(_Record(key, ancestors, tuple((i, a) for i, a in enumerate(leaves) if _is_array(a))))
        return next_fun(*args, **kwargs)

      out = self._forward({"params": params}, x, c_noise,
                          _Interceptor(self._producers, replace_producers(producer_keys, embeddings), on_call))
      return out, [a for record in records for _, a in record.arrays]

    masks, (out_shape, _) = _trace_masks(analysed, (params, x, c_noise, embeddings),
                                         (0, _ON_X, _ON_C_NOISE, _ON_TEMB))
    if not isinstance(out_shape, jax.ShapeDtypeStruct) or tuple(out_shape.shape) != x.shape:
      raise ValueError(f"{self._describe()} returns {out_shape} for input of shape {x.shape}; a denoiser needs an "
                       "output of the input's shape: select or reshape it with `call`")
    out_leaves = len(jax.tree.leaves(out_shape))
    arg_masks = iter(masks[out_leaves:])
    time_args = {}  # key -> [(arg index, shape, dtype)] of its arguments computed from temb and not from x
    mixed = set()
    for record in records:
      for index, array in record.arrays:
        mask = next(arg_masks)
        if mask & _ON_TEMB and not mask & _ON_X:
          time_args.setdefault(record.key, []).append((index, tuple(array.shape), array.dtype))
        elif mask & _ON_TEMB:
          mixed.add(record.key)
    producer_names = ", ".join(dict.fromkeys(_display(k[0], k[1]) for k in producer_keys))
    by_key = {record.key: record for record in records}
    repeated = {(path, method) for (path, method, occurrence) in by_key if occurrence > 0}
    name = lambda key: _call_name(key, key[:2] in repeated)  # noqa: E731

    if self._consumers is None:
      nested = {ancestor for key in time_args for ancestor in by_key[key].ancestors}
      consumers = [key for key in time_args if key not in nested]
      if not consumers:
        raise ValueError(f"no submodule call receives the output of the time embedding ({producer_names}) without "
                         f"the data x; its uses are not inside submodules, or it is mixed with x first. Name the "
                         f"conditioned layers with `conditioned_layers`; called: {_listing(called)}")
    else:
      matched = [record.key for record in records if _matches(self._consumers, *record.key[:2])]
      for pattern in self._consumers:
        if not any(pattern.fullmatch(n) for key in matched for n in _names_to_match(*key[:2])):
          raise ValueError(f"conditioned_layers {pattern.pattern!r} matches no submodule or method called outside "
                           f"the time embedding ({producer_names}) in a forward pass of {self._describe()}; called: "
                           f"{_listing(called)}")
      for key in matched:
        if key not in time_args:
          how = "mixes it with the data x" if key in mixed else "does not receive it"
          raise ValueError(f"conditioned layer {name(key)} must receive the time embedding ({producer_names}), or "
                           f"something computed from it alone, as an input, but {how}")
        inner = [other for other in matched if key in by_key[other].ancestors]
        if inner:
          raise ValueError(f"conditioned layers {name(key)} and {name(inner[0])} are nested: name the outer or the "
                           "inner ones, not both")
      consumers = matched

    sites, dtypes = [], []
    for key in consumers:
      args = time_args[key]
      for i, (index, shape, dtype) in enumerate(args):
        site_name = name(key) + (f"[{i}]" if len(args) > 1 else "")
        if len(shape) < 1 or shape[0] != batch:
          raise ValueError(f"the time input of conditioned layer {site_name} has shape {shape} for a batch of "
                           f"{batch}: a conditioned layer must receive a per-sample input [batch, ...]")
        sites.append(_Site(site_name, key, index, shape[1:]))
        dtypes.append(dtype)

    # Pass 3: with every conditioned layer's input replaced, nothing else may carry the noise level to the output.
    def lifted(params, x, c_noise, embeddings, leaves):
      replace = {(site.key, site.arg_index): leaf for site, leaf in zip(sites, leaves)}

      def on_call(key, ancestors, next_fun, args, kwargs):
        flat, treedef = jax.tree.flatten((args, kwargs))
        flat = [replace.get((key, i), leaf) for i, leaf in enumerate(flat)]
        args, kwargs = jax.tree.unflatten(treedef, flat)
        return next_fun(*args, **kwargs)

      return self._forward({"params": params}, x, c_noise,
                           _Interceptor(self._producers, replace_producers(producer_keys, embeddings), on_call))

    leaves = [jax.ShapeDtypeStruct((batch,) + site.trailing_shape, dtype) for site, dtype in zip(sites, dtypes)]
    out_masks, _ = _trace_masks(lifted, (params, x, c_noise, embeddings, leaves), (0, _ON_X, _ON_C_NOISE, _ON_TEMB, 0))
    out_mask = functools.reduce(operator.or_, out_masks, 0)
    if out_mask & _ON_C_NOISE:
      raise ValueError(f"the output of {self._describe()} depends on its noise input other than through the time "
                       f"embedding ({producer_names}): name every submodule that reads the noise level in "
                       "`time_embedding` (or move the use there)")
    if out_mask & _ON_TEMB:
      chosen = set(consumers)
      unnamed = [name(key) for key in time_args if key not in chosen and not (set(by_key[key].ancestors) & chosen)
                 and not any(key in by_key[c].ancestors for c in consumers)]
      where = (f"calls that receive it and are not conditioned layers: {_listing(unnamed)}" if unnamed else
               "it is used outside any submodule (e.g. added to an activation in __call__): move that use into a "
               "submodule")
      raise ValueError(f"the time embedding ({producer_names}) reaches the output of {self._describe()} other than "
                       f"through the conditioned layers {[s.name for s in sites]}; {where}")
    return tuple(sites)

  # --- the Backbone interface ------------------------------------------------------------------------------------

  def init(self, rng: jax.Array) -> Params:
    """Fresh parameters (the model's own initialisation) from ``rng``, for a batch of one."""
    x = jnp.zeros((1,) + self.data_shape, jnp.float32)
    return self.module.init({"params": rng}, x, jnp.zeros((1,), jnp.float32), method=self._call)["params"]

  def time_embedding(self, params: Params, c_noise: jax.Array) -> TimeEmb:
    """``{layer: [B, D]}``: each conditioned layer's input in the model's own forward pass at ``c_noise`` [B] (a
    scalar counts as [1]), in the dtype the model computes it in.

    Cost: the model runs on a placeholder ``x`` (zeros; the inputs do not depend on it) until its last conditioned
    layer; eagerly that is about one forward pass, under jit the unused part is compiled away.
    """
    c_noise = jnp.atleast_1d(c_noise)
    if c_noise.ndim != 1:
      raise ValueError(f"c_noise must be a scalar or have shape [batch], got shape {tuple(c_noise.shape)}")
    batch = c_noise.shape[0]
    dtype = c_noise.dtype if jnp.issubdtype(c_noise.dtype, jnp.floating) else jnp.float32
    captured: dict[str, jax.Array] = {}

    def on_call(key, ancestors, next_fun, args, kwargs):
      del ancestors
      sites = self._sites_by_key.get(key)
      if sites:
        flat = jax.tree.leaves((args, kwargs))
        for site in sites:
          captured[site.name] = jnp.reshape(flat[site.arg_index], (batch, site.width))
        if len(captured) == len(self._sites):
          raise _Stop
      return next_fun(*args, **kwargs)

    try:
      self._forward({"params": params}, jnp.zeros((batch,) + self.data_shape, dtype), c_noise,
                    _Interceptor(self._producers, _passthrough_producer, on_call))
    except _Stop:
      return {name: captured[name] for name in self.layer_names}
    missing = [name for name in self.layer_names if name not in captured]
    raise ValueError(f"the forward pass of {self._describe()} did not reach the conditioned layers {missing}")

  def add_label(self, params: Params, temb: TimeEmb, label: jax.Array | None) -> TimeEmb:
    """``temb`` unchanged; ``label`` must be None (the model is unconditional)."""
    del params
    self.check_label(label, values=False)
    return temb

  def embed_time(self, params: Params, c_noise: jax.Array, label: jax.Array | None = None) -> TimeEmb:
    """``time_embedding(params, c_noise)``; ``label`` must be None."""
    self.check_label(label)
    return self.time_embedding(params, c_noise)

  def body(self, params: Params, x: jax.Array, temb: TimeEmb, *, train: bool = False,
           rng: jax.Array | None = None) -> jax.Array:
    """The model on ``x`` [B, *data_shape] with each conditioned layer's input replaced by ``temb[layer]`` [B, D]
    (cast to the dtype of the input it replaces); the model's noise input is ``placeholder_c_noise``, which reaches
    nothing. ``body(params, x, embed_time(params, c_noise)) == apply(params, x, c_noise)`` bit for bit."""
    del rng  # inference only: nothing random runs
    self._check_inference(train)
    self.check_input(x)
    if set(temb) != set(self.layer_names):
      raise ValueError(f"temb must have one leaf per conditioned layer {list(self.layer_names)}, got {sorted(temb)}")
    batch = x.shape[0]
    for site in self._sites:
      if tuple(jnp.shape(temb[site.name])) != (batch, site.width):
        raise ValueError(f"temb[{site.name!r}] has shape {tuple(jnp.shape(temb[site.name]))}; expected "
                         f"[batch, D] = {(batch, site.width)}")
    replaced: set[str] = set()

    def on_call(key, ancestors, next_fun, args, kwargs):
      del ancestors
      sites = self._sites_by_key.get(key)
      if sites:
        flat, treedef = jax.tree.flatten((args, kwargs))
        for site in sites:
          original = flat[site.arg_index]
          flat[site.arg_index] = jnp.reshape(temb[site.name], (batch,) + site.trailing_shape).astype(original.dtype)
          replaced.add(site.name)
        args, kwargs = jax.tree.unflatten(treedef, flat)
      return next_fun(*args, **kwargs)

    dtype = x.dtype if jnp.issubdtype(x.dtype, jnp.floating) else jnp.float32
    out = self._forward({"params": params}, x, jnp.full((batch,), self.placeholder_c_noise, dtype),
                        _Interceptor(self._producers, _passthrough_producer, on_call))
    if len(replaced) != len(self._sites):
      missing = [name for name in self.layer_names if name not in replaced]
      raise ValueError(f"the forward pass of {self._describe()} did not reach the conditioned layers {missing}")
    return out

  def apply(self, params: Params, x: jax.Array, c_noise: jax.Array, label: jax.Array | None = None, *,
            train: bool = False, rng: jax.Array | None = None) -> jax.Array:
    """The model's own forward pass ``call(module, x, c_noise)`` with ``c_noise`` broadcast to [B]."""
    del rng
    self._check_inference(train)
    self.check_input(x)
    self.check_label(label, x.shape[0])
    return self.module.apply({"params": params}, x, jnp.broadcast_to(c_noise, x.shape[:1]), method=self._call)

  @staticmethod
  def _check_inference(train: bool) -> None:
    if train:
      raise ValueError("LinenBackbone runs the model in inference mode (train=False): it is a frozen teacher; "
                       "pass the model's own training flags through `call`")
