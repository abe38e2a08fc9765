"""A tiny chokepoint network and stem-sharing runtime shared by the e2e piece/timing tests."""

from mainstream_jax.e2e import basenet, runtime, training

TINY = dict(widths=(4, 8), strides=(1, 2), stem_width=4, stem_strides=2, hidden=8)
SHAPE = (8, 8, 1)
F = 10  # stream frames per second


def tiny_network():
    """(spec, model, base variables) of the tiny network."""
    spec = basenet.mobilenet_spec(**TINY)
    model = basenet.ChokepointNet(spec, 1)
    base = basenet.init_variables(model, SHAPE, 0)
    return spec, model, base


def tiny_runtime(tiny, ks, fps, batch_apps=False, fused=False, windows=2):
    """A runtime of one app per (k, fps), each with its own fine-tuned-looking branch."""
    spec, model, base = tiny
    apps = [training.assemble_app(base, basenet.select_layers(
        basenet.init_variables(model, SHAPE, 10 + a), spec, k, spec.num_layers), spec, k)
        for a, k in enumerate(ks)]
    return runtime.StemRuntime(model, base, apps, ks, fps, stream_fps=F,
                               windows_per_call=windows, mean=0.3, std=0.3,
                               batch_apps=batch_apps, fused=fused)
