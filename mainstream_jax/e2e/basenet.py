"""A MobileNet-style base network whose layers can be run in any contiguous range.

Mainstream needs three views of one network: the whole net (pre-training on the base
task), a *stem* ``[0, k)`` (frozen, shared between apps) and a *branch* ``[k, L)`` (each
app's own fine-tuned copy). :class:`ChokepointNet` is a flat list of layers, each its own
flax submodule named ``layer_XX_<name>``, and ``__call__(x, start, end)`` runs exactly the
layers ``start..end-1``. Because parameters are keyed by layer, the variables of a base
network, of a stem and of a branch are the same dicts; ``stem(x) -> branch`` equals the
full network bit for bit up to XLA's op fusion (tested).

Layer = one conv + BatchNorm + ReLU unit, as profiled: the depthwise and pointwise halves
of a separable block are separate layers (so their costs are separate entries of the
cost model). Every layer boundary is a chokepoint: the net is a chain, so a single
tensor crosses each cut.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sb_jax.models import layers as sb_layers

LAYER_KINDS = ("conv", "dw", "pw", "pool", "dense", "head")


@dataclasses.dataclass(frozen=True)
class LayerSpec:
    """One layer of the base network.

    ``features`` is the output width (ignored for ``dw`` and ``pool``, which keep the
    channel count); ``strides`` applies to ``conv`` and ``dw``.
    """

    name: str
    kind: str
    features: int = 0
    strides: int = 1


@dataclasses.dataclass(frozen=True)
class NetSpec:
    """A base network: its layers and the chokepoints (allowed numbers of frozen layers)."""

    layers: tuple[LayerSpec, ...]
    chokepoints: tuple[int, ...]

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def layer_names(self) -> tuple[str, ...]:
        return tuple(layer_key(i, s) for i, s in enumerate(self.layers))


def layer_key(index: int, spec: LayerSpec) -> str:
    """Parameter-collection key of layer ``index``."""
    return f"layer_{index:02d}_{spec.name}"


def mobilenet_spec(
    widths: Sequence[int] = (24, 32, 64, 64, 128),
    strides: Sequence[int] = (1, 2, 1, 2, 1),
    stem_width: int = 16,
    stem_strides: int = 2,
    hidden: int = 64,
) -> NetSpec:
    """A MobileNet-v1-style net for small grey images.

    conv3x3(stem_width, stem_strides) -> len(widths) separable blocks (dw3x3 stride s,
    pw1x1 width w) -> global average pool -> Dense(hidden)+ReLU -> head. Every layer
    boundary but the last is a chokepoint (one tensor crosses each): 2 * len(widths) + 4
    of them (14 on 14 layers with the defaults), so apps can share anything from nothing
    to all but the head.
    """
    if len(widths) != len(strides) or not widths:
        raise ValueError(
            f"widths and strides need the same non-zero length, got {len(widths)} and "
            f"{len(strides)}"
        )
    for name, values in (("widths", widths), ("strides", strides)):
        if any(not sb_layers.is_positive_int(v) for v in values):
            raise ValueError(f"{name} must be positive integers, got {tuple(values)}")
    for name, v in (("stem_width", stem_width), ("stem_strides", stem_strides),
                    ("hidden", hidden)):
        if not sb_layers.is_positive_int(v):
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    layers = [LayerSpec("conv1", "conv", stem_width, stem_strides)]
    for b, (w, s) in enumerate(zip(widths, strides, strict=True), start=1):
        layers.append(LayerSpec(f"dw{b}", "dw", 0, s))
        layers.append(LayerSpec(f"pw{b}", "pw", w, 1))
    layers.append(LayerSpec("pool", "pool"))
    layers.append(LayerSpec("fc", "dense", hidden))
    layers.append(LayerSpec("head", "head"))
    return NetSpec(layers=tuple(layers), chokepoints=tuple(range(len(layers))))


def _taps(x: jax.Array, strides: int) -> list[jax.Array]:
    """The nine shifted (and strided) views of ``x`` a 'SAME' 3x3 convolution reads, in
    kernel order (row i, column j)."""
    h, w = x.shape[1], x.shape[2]
    out_h, out_w = -(-h // strides), -(-w // strides)
    # 'SAME' padding: total pad so that out = ceil(in / stride), the extra pixel at the end.
    pad_h = max((out_h - 1) * strides + 3 - h, 0)
    pad_w = max((out_w - 1) * strides + 3 - w, 0)
    xp = jnp.pad(x, ((0, 0), (pad_h // 2, pad_h - pad_h // 2),
                     (pad_w // 2, pad_w - pad_w // 2), (0, 0)))
    return [xp[:, i:i + (out_h - 1) * strides + 1:strides,
               j:j + (out_w - 1) * strides + 1:strides, :]
            for i in range(3) for j in range(3)]


def depthwise3x3(x: jax.Array, kernel: jax.Array, strides: int) -> jax.Array:
    """'SAME' 3x3 depthwise convolution as nine shifted multiply-adds.

    Equal to ``lax.conv_general_dilated`` with ``feature_group_count = C`` (tested), but
    XLA's CPU backend runs that grouped convolution's input gradient ~30x slower than
    this form (128 x 28 x 28 x 16: 629 ms against 21 ms), which would dominate
    fine-tuning here. ``kernel`` is flax's layout, [3, 3, 1, C].
    """
    out = None
    for t, tap in enumerate(_taps(x, strides)):
        tap = tap * kernel[t // 3, t % 3, 0]
        out = tap if out is None else out + tap
    return out


def conv3x3(x: jax.Array, kernel: jax.Array, strides: int) -> jax.Array:
    """'SAME' 3x3 convolution as nine shifted matmuls over the channels; ``kernel`` is
    [3, 3, C_in, C_out] (flax's layout). Equal to ``lax.conv_general_dilated`` (tested).

    Why not XLA's convolution: every program here is ``vmap``-ed over apps (stacked
    kernels), and XLA lowers a vmapped convolution to a grouped one, whose CPU gradient
    is the slow path (see :func:`depthwise3x3`); a vmapped matmul is a batched matmul.
    The chunked CPU kernel gradient of ``sb_jax`` also unrolls into large programs
    that took ~40 s to compile per fine-tuning step.
    """
    out = None
    for t, tap in enumerate(_taps(x, strides)):
        tap = jnp.einsum("bhwc,cf->bhwf", tap, kernel[t // 3, t % 3])
        out = tap if out is None else out + tap
    return out


def pointwise(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """1x1 convolution as a matmul over the channels (kernel [1, 1, C_in, C_out]); same
    reasons as :func:`conv3x3`."""
    return jnp.einsum("bhwc,cf->bhwf", x, kernel[0, 0])


class DepthwiseConv3x3(nn.Module):
    """Bias-free 3x3 depthwise conv, Kaiming fan_out init like ``sb_layers.conv``."""

    strides: int = 1

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        kernel = self.param("kernel", sb_layers.conv_kernel_init, (3, 3, 1, c), jnp.float32)
        return depthwise3x3(x, kernel, self.strides)


class Conv(nn.Module):
    """Bias-free 'SAME' 3x3 or 1x1 convolution with ``sb_layers.conv``'s parameters
    (``kernel`` [s, s, C_in, C_out], Kaiming fan_out), computed as matmuls."""

    features: int
    kernel_size: int
    strides: int = 1

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        s = self.kernel_size
        kernel = self.param("kernel", sb_layers.conv_kernel_init,
                            (s, s, x.shape[-1], self.features), jnp.float32)
        if s == 1 and self.strides == 1:
            return pointwise(x, kernel)
        if s == 3:
            return conv3x3(x, kernel, self.strides)
        raise ValueError(f"unsupported conv: {s}x{s} stride {self.strides}")


class _Layer(nn.Module):
    spec: LayerSpec
    num_outputs: int

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        s = self.spec
        if s.kind == "conv":
            x = Conv(s.features, 3, s.strides, name="Conv_0")(x)
            return nn.relu(sb_layers.batch_norm(train)(x))
        if s.kind == "dw":
            x = DepthwiseConv3x3(s.strides, name="dw")(x)
            return nn.relu(sb_layers.batch_norm(train)(x))
        if s.kind == "pw":
            x = Conv(s.features, 1, name="Conv_0")(x)
            return nn.relu(sb_layers.batch_norm(train)(x))
        if s.kind == "pool":
            return x.mean(axis=(1, 2))
        if s.kind == "dense":
            return nn.relu(nn.Dense(s.features, kernel_init=sb_layers.dense_kernel_init)(x))
        if s.kind == "head":
            return sb_layers.head(self.num_outputs)(x)
        raise ValueError(f"unknown layer kind {s.kind!r}; choose one of {LAYER_KINDS}")


class ChokepointNet(nn.Module):
    """The base network (``num_outputs`` = base classes) or an app's detector (1 logit).

    ``__call__(x, start=0, end=None, train=False)`` runs layers ``[start, end)``; ``x`` is
    the input of layer ``start`` (normalised images when ``start == 0``).
    """

    spec: NetSpec
    num_outputs: int

    @nn.compact
    def __call__(
        self, x: jax.Array, start: int = 0, end: int | None = None, train: bool = False
    ) -> jax.Array:
        end = self.spec.num_layers if end is None else end
        if not 0 <= start <= end <= self.spec.num_layers:
            raise ValueError(
                f"layer range [{start}, {end}) is outside [0, {self.spec.num_layers}]"
            )
        for i in range(start, end):
            s = self.spec.layers[i]
            x = _Layer(s, self.num_outputs, name=layer_key(i, s))(x, train)
        return x


def init_variables(model: ChokepointNet, image_shape: Sequence[int], seed: int) -> dict:
    """Variables ``{'params', 'batch_stats'}`` of the whole network."""
    x = jnp.zeros((1, *image_shape), jnp.float32)
    return model.init(jax.random.key(seed, impl="rbg"), x, 0, None, False)


def activation_shapes(model: ChokepointNet, image_shape: Sequence[int]) -> list[tuple]:
    """Per-frame input shape of every layer, plus the output shape (L + 1 entries)."""
    shapes = [tuple(image_shape)]
    variables = jax.eval_shape(lambda: init_variables(model, image_shape, 0))
    x = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
    for i in range(model.spec.num_layers):
        x = jax.eval_shape(lambda v, h, i=i: model.apply(v, h, i, i + 1, False), variables, x)
        shapes.append(tuple(x.shape[1:]))
    return shapes


def layer_param_bytes(variables: dict, spec: NetSpec) -> np.ndarray:
    """Bytes of the variables (params and BN statistics) each layer needs at inference."""
    out = np.zeros(spec.num_layers, np.float64)
    for i, name in enumerate(spec.layer_names):
        for collection in ("params", "batch_stats"):
            sub = variables.get(collection, {}).get(name)
            if sub is not None:
                out[i] += sum(np.asarray(a).nbytes for a in jax.tree.leaves(sub))
    return out


def select_layers(variables: dict, spec: NetSpec, start: int, end: int) -> dict:
    """The sub-dict of ``variables`` holding layers ``[start, end)``."""
    keep = set(spec.layer_names[start:end])
    return {c: {k: v for k, v in tree.items() if k in keep} for c, tree in variables.items()}


def merge_layers(*parts: dict) -> dict:
    """Union of per-layer variable dicts (later ones win on a shared layer)."""
    out: dict[str, dict[str, Any]] = {}
    for part in parts:
        for c, tree in part.items():
            out.setdefault(c, {}).update(tree)
    return out
