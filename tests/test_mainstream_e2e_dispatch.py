"""The CPU dispatch mode the e2e runtime and profiler run under
(runtime.set_cpu_inline_dispatch): inline runs a jitted call on the calling thread, so its
result is ready when the call returns; asynchronous dispatch returns first. The mode is
fixed when the backend starts, so each mode is checked in a fresh process."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from mainstream_jax.e2e import runtime

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_DRIVER = """
import sys
import jax, jax.numpy as jnp
from mainstream_jax.e2e import runtime
inline = sys.argv[1] == "1"
runtime.set_cpu_inline_dispatch(inline)
runtime.set_cpu_inline_dispatch(inline)  # the same mode again: a no-op
f = jax.jit(lambda x: jnp.tanh(x @ x) @ x)  # ~1 GFLOP: milliseconds on any CPU
x = jnp.ones((640, 640), jnp.float32).block_until_ready()
f(x).block_until_ready()  # compile
out = f(x)
ready = out.is_ready()
try:
    runtime.set_cpu_inline_dispatch(not inline)
    late = "accepted"
except RuntimeError:
    late = "raised"
print("RESULT", runtime.cpu_inline_dispatch(), ready, late)
"""


@pytest.mark.parametrize("inline", [True, False])
def test_dispatch_mode_is_set_before_the_backend_starts(inline):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", _DRIVER, "1" if inline else "0"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")][-1]
    # Inline: the call returned with its result computed. Asynchronous: it returned
    # while the worker thread was still computing. Either way a later request for the
    # other mode is refused (the backend has started).
    assert line.split()[1:] == [str(inline), str(inline), "raised"]


def test_dispatch_mode_cannot_change_once_the_backend_runs():
    jnp.zeros(1).block_until_ready()  # the backend has started in this process
    mode = runtime.cpu_inline_dispatch()
    runtime.set_cpu_inline_dispatch(mode)  # no-op
    with pytest.raises(RuntimeError, match="before the first JAX computation"):
        runtime.set_cpu_inline_dispatch(not mode)
    assert runtime.cpu_inline_dispatch() == mode
    assert jax.config.read("jax_cpu_enable_async_dispatch") == (not mode)
