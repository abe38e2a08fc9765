"""Convolution and max-pool formulations that are fast on XLA's CPU backend.

Same functions, same gradients, different programs. On XLA's CPU backend (jaxlib 0.10)
two gradients dominate a small convnet's train step (measured in
`benchmarks/cpu_train_step.py`, results in `benchmarks/results/cpu_train_step/`):

* max pool: XLA differentiates `reduce_window(max)` into `select_and_scatter`, which
  costs 60x the pool's forward pass here. `max_pool` keeps XLA's forward and, for the
  gradient, reshapes the non-overlapping windows and routes each window's gradient to
  its first maximum with elementwise ops: exactly `select_and_scatter`'s result (ties
  included), about 13x cheaper (batch 128: 61 -> 4.6 ms at 28x28x32).
* conv kernel gradient: XLA's backprop-filter convolution over a whole batch runs 2-4x
  slower than over the same batch cut into cache-sized chunks (its working set, not
  its arithmetic, is the problem). `conv2d` keeps XLA's forward and input-gradient
  convolutions and sums XLA's kernel gradient over batch chunks
  (`kernel_grad_chunk`). im2col formulations (patches from shifted slices and one
  matmul, per kernel row, per tap, or over a flattened padded image) were measured
  too and lost: XLA's CPU backend copies the slices slowly.

`impl` picks the formulation: "xla" (XLA's native operations; what GPUs and TPUs get),
"cpu" (the formulations above) or "auto" (resolved when the function is traced: "cpu"
on the CPU backend, "xla" elsewhere). Accelerators keep XLA's operations because their
convolution and pooling gradients are fast already and the custom forms would only
add memory traffic.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

IMPLS = ("auto", "xla", "cpu")
_DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")
# Target bytes of input + output-gradient per batch chunk of the kernel gradient (see
# `kernel_grad_chunk`): measured on a 2-core x86 machine, 2-4x faster than one
# whole-batch backprop-filter convolution for most ResNet/WRN shapes.
_CHUNK_TARGET_BYTES = 1 << 20
_MAX_CHUNKS = 32


def check_impl(impl: str, where: str) -> None:
    """Raises ValueError unless `impl` names a formulation."""
    if impl not in IMPLS:
        raise ValueError(f"{where}: ops must be one of {list(IMPLS)}, got {impl!r}.")


def resolve_impl(impl: str) -> str:
    """'auto' -> 'cpu' on the CPU backend, 'xla' on any other; others unchanged."""
    check_impl(impl, "resolve_impl")
    if impl == "auto":
        return "cpu" if jax.default_backend() == "cpu" else "xla"
    return impl


def _xla_conv(
    x: jax.Array, kernel: jax.Array, strides: tuple[int, int], feature_group_count: int = 1
) -> jax.Array:
    return lax.conv_general_dilated(
        x,
        kernel,
        strides,
        "SAME",
        dimension_numbers=_DIMENSION_NUMBERS,
        feature_group_count=feature_group_count,
    )


def kernel_grad_chunk(
    batch: int, example_bytes: int, kernel_bytes: int, max_chunks: int = _MAX_CHUNKS
) -> int:
    """Examples per chunk for the kernel gradient: a divisor of `batch`.

    XLA's CPU backprop-filter convolution slows down several-fold once a whole batch of
    inputs and output gradients no longer fits in cache, so the gradient is summed over
    chunks of about max(1 MiB, kernel size) each. A big kernel needs big chunks, since
    every chunk writes a whole kernel-sized partial sum.
    """
    target = max(_CHUNK_TARGET_BYTES, kernel_bytes) // max(example_bytes, 1)
    target = max(target, -(-batch // max_chunks), 1)
    return max(d for d in range(1, batch + 1) if batch % d == 0 and d <= target)


def _kernel_grad(x: jax.Array, dy: jax.Array, kernel: jax.Array, strides: tuple[int, int]):
    """d loss / d kernel as a sum of XLA's kernel gradients over batch chunks."""
    n = x.shape[0]
    example_bytes = (math.prod(x.shape[1:]) + math.prod(dy.shape[1:])) * x.dtype.itemsize
    per_chunk = kernel_grad_chunk(n, example_bytes, kernel.size * kernel.dtype.itemsize)
    grad = None
    # An unrolled Python loop, not lax.scan/fori: XLA's CPU backend runs convolutions
    # inside loops far more slowly than at the top level.
    for start in range(0, n, per_chunk):
        x_chunk = lax.slice_in_dim(x, start, start + per_chunk)
        dy_chunk = lax.slice_in_dim(dy, start, start + per_chunk)
        _, kernel_vjp = jax.vjp(functools.partial(_xla_conv, x_chunk, strides=strides), kernel)
        (part,) = kernel_vjp(dy_chunk)
        grad = part if grad is None else grad + part
    return grad


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _cpu_conv(x: jax.Array, kernel: jax.Array, strides: tuple[int, int]) -> jax.Array:
    return _xla_conv(x, kernel, strides)


def _cpu_conv_fwd(x, kernel, strides):
    return _xla_conv(x, kernel, strides), (x, kernel)


def _cpu_conv_bwd(strides, residuals, dy):
    x, kernel = residuals
    # XLA's own transpose for the input gradient: it is as fast as the forward here.
    _, input_vjp = jax.vjp(lambda x_: _xla_conv(x_, kernel, strides), x)
    (dx,) = input_vjp(dy)
    dkernel = _kernel_grad(x, dy, kernel, strides)
    return dx, dkernel


_cpu_conv.defvjp(_cpu_conv_fwd, _cpu_conv_bwd)


def conv2d(
    x: jax.Array,
    kernel: jax.Array,
    strides: int | tuple[int, int] = 1,
    *,
    feature_group_count: int = 1,
    impl: str = "auto",
) -> jax.Array:
    """'SAME' 2-D convolution of NHWC `x` with an HWIO `kernel`, no bias.

    Grouped convolutions (depthwise ones included) always use XLA's operation: the
    custom kernel gradient covers the dense case only.
    """
    if isinstance(strides, int):
        strides = (strides, strides)
    strides = tuple(int(s) for s in strides)
    if resolve_impl(impl) == "xla" or feature_group_count != 1:
        return _xla_conv(x, kernel, strides, feature_group_count)
    return _cpu_conv(x, kernel, strides)


def _windows(x: jax.Array, window: int) -> jax.Array:
    n, h, w, c = x.shape
    return x.reshape(n, h // window, window, w // window, window, c)


def _xla_max_pool(x: jax.Array, window: int) -> jax.Array:
    dims = (1, window, window, 1)
    return lax.reduce_window(x, -jnp.inf, lax.max, dims, dims, "VALID")


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _cpu_max_pool(x: jax.Array, window: int) -> jax.Array:
    # XLA's forward is fast (and fuses with its neighbours); only its gradient is not.
    return _xla_max_pool(x, window)


def _cpu_max_pool_fwd(x, window):
    y = _cpu_max_pool(x, window)
    return y, (x, y)


def _cpu_max_pool_bwd(window, residuals, dy):
    x, y = residuals
    windows = _windows(x, window)
    n, ho, _, wo, _, c = windows.shape
    # Position of each window's first maximum in row-major order: select_and_scatter's
    # choice, so ties route the gradient exactly as XLA's own pool gradient does.
    flat = jnp.transpose(windows, (0, 1, 3, 5, 2, 4)).reshape(n, ho, wo, c, window * window)
    is_max = flat == y[..., None]
    first = jnp.argmax(is_max, axis=-1)
    mask = first[..., None] == jnp.arange(window * window)
    dx_flat = jnp.where(mask, dy[..., None], jnp.zeros((), dy.dtype))
    dx = jnp.transpose(dx_flat.reshape(n, ho, wo, c, window, window), (0, 1, 4, 2, 5, 3))
    return (dx.reshape(n, ho * window, wo * window, c),)


_cpu_max_pool.defvjp(_cpu_max_pool_fwd, _cpu_max_pool_bwd)


def max_pool(x: jax.Array, window: int, *, impl: str = "auto") -> jax.Array:
    """Non-overlapping `window` x `window` max pool with stride `window`, 'VALID' padding.

    Rows and columns that do not fill a window are dropped, as `flax.linen.max_pool` does.
    """
    n, h, w, c = x.shape
    if h < window or w < window:
        raise ValueError(f"max_pool: a {window}x{window} window needs a larger input than {h}x{w}.")
    if resolve_impl(impl) == "xla":
        return _xla_max_pool(x, window)
    cropped = x[:, : h - h % window, : w - w % window, :]
    return _cpu_max_pool(cropped, window)


def _bn_stats(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    # flax's BatchNorm statistics (use_fast_variance): E[x^2] - E[x]^2, clipped at 0.
    axes = tuple(range(x.ndim - 1))
    x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    mean = jnp.mean(x, axes)
    mean_sq = jnp.mean(lax.square(x), axes)
    return mean, jnp.maximum(0.0, mean_sq - lax.square(mean))


def _bn_relu_reference(x, scale, bias, epsilon):
    mean, var = _bn_stats(x)
    # flax's normalisation order: (x - mean) * (rsqrt(var + eps) * scale) + bias.
    y = (x - mean) * (lax.rsqrt(var + epsilon) * scale) + bias
    return jax.nn.relu(y), mean, var


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _cpu_bn_relu(x, scale, bias, epsilon):
    return _bn_relu_reference(x, scale, bias, epsilon)


def _cpu_bn_relu_fwd(x, scale, bias, epsilon):
    out = _bn_relu_reference(x, scale, bias, epsilon)
    mean, var = out[1], out[2]
    return out, (x, scale, bias, mean, lax.rsqrt(var + epsilon))


def _cpu_bn_relu_bwd(epsilon, residuals, cotangents):
    del epsilon
    x, scale, bias, mean, inv_std = residuals
    dy, dmean, dvar = cotangents
    axes = tuple(range(x.ndim - 1))
    count = math.prod(x.shape[:-1])
    centred = x - mean
    # The forward's own pre-activation, recomputed the same way, gives the same ReLU mask.
    live = centred * (inv_std * scale) + bias > 0
    dz = jnp.where(live, dy, jnp.zeros((), dy.dtype))
    x_hat = centred * inv_std
    dbias = jnp.sum(dz, axes)
    dscale = jnp.sum(dz * x_hat, axes)
    # Batch-statistics backward in closed form: one pass for the two sums above, one for
    # dx. The mean/var outputs only feed the running averages, so their cotangents are
    # zero in training; they are folded in all the same so the op is a true VJP.
    dx = (scale * inv_std / count) * (count * dz - dbias - x_hat * dscale)
    dx = dx + (dmean + 2.0 * dvar * centred) / count
    return dx, dscale, dbias


_cpu_bn_relu.defvjp(_cpu_bn_relu_fwd, _cpu_bn_relu_bwd)


def batch_norm_relu(
    x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float, *, impl: str = "auto"
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """ReLU(BatchNorm(x)) with batch statistics over all but the last axis (training).

    Returns (activations, batch mean, batch variance): flax `nn.BatchNorm`'s function in
    training mode (fast variance, biased) followed by `nn.relu`. The "cpu" form has a
    hand-written backward pass (two passes over `x`, against the six or so XLA makes of
    the automatic one: about 30 % less time at 128x28x28x32); float32 only, other dtypes
    use XLA's form.
    """
    if resolve_impl(impl) == "xla" or x.dtype != jnp.float32:
        return _bn_relu_reference(x, scale, bias, epsilon)
    return _cpu_bn_relu(x, scale, bias, float(epsilon))
