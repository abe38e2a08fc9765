"""Base network of the Mainstream e2e loop: chokepoint slicing and the depthwise conv."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from mainstream_jax.e2e import basenet

TINY = dict(widths=(4, 8), strides=(1, 2), stem_width=4, stem_strides=2, hidden=8)
SHAPE = (8, 8, 1)


@pytest.fixture(scope="module")
def tiny():
    spec = basenet.mobilenet_spec(**TINY)
    model = basenet.ChokepointNet(spec, 3)
    variables = basenet.init_variables(model, SHAPE, 0)
    # Non-trivial BatchNorm statistics, so that eval mode is not the identity.
    variables = jax.tree.map(lambda x: x, variables)
    rng = np.random.default_rng(0)
    stats = jax.tree.map(lambda x: jnp.asarray(rng.uniform(0.5, 1.5, x.shape), x.dtype),
                         variables["batch_stats"])
    return model, {"params": variables["params"], "batch_stats": stats}


def test_default_spec_has_more_than_ten_chokepoints():
    spec = basenet.mobilenet_spec()
    assert len(spec.chokepoints) > 10
    assert spec.chokepoints[0] == 0 and spec.chokepoints[-1] == spec.num_layers - 1
    assert spec.layers[-1].kind == "head"


@pytest.mark.parametrize("kwargs", [dict(widths=(4,), strides=(1, 2)), dict(widths=()),
                                    dict(widths=(0,), strides=(1,)), dict(hidden=0),
                                    dict(stem_strides=1.5)])
def test_bad_specs_raise(kwargs):
    with pytest.raises(ValueError):
        basenet.mobilenet_spec(**{**TINY, **kwargs})


@pytest.mark.parametrize("strides", [1, 2])
@pytest.mark.parametrize("size", [8, 7])
def test_depthwise_matches_grouped_conv(strides, size):
    x = jax.random.normal(jax.random.key(0), (2, size, size, 5))
    k = jax.random.normal(jax.random.key(1), (3, 3, 1, 5))
    ref = lax.conv_general_dilated(x, k, (strides, strides), "SAME",
                                   dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                   feature_group_count=5)
    np.testing.assert_allclose(basenet.depthwise3x3(x, k, strides), ref, atol=1e-5)


@pytest.mark.parametrize("strides", [1, 2])
@pytest.mark.parametrize("size", [8, 7])
def test_conv3x3_and_pointwise_match_lax_conv(strides, size):
    x = jax.random.normal(jax.random.key(0), (2, size, size, 3))
    k = jax.random.normal(jax.random.key(1), (3, 3, 3, 4))
    dn = ("NHWC", "HWIO", "NHWC")
    ref = lax.conv_general_dilated(x, k, (strides, strides), "SAME", dimension_numbers=dn)
    np.testing.assert_allclose(basenet.conv3x3(x, k, strides), ref, atol=1e-5)
    k1 = k[1:2, 1:2]
    ref1 = lax.conv_general_dilated(x, k1, (1, 1), "SAME", dimension_numbers=dn)
    np.testing.assert_allclose(basenet.pointwise(x, k1), ref1, atol=1e-5)


def test_stem_then_branch_equals_full_network(tiny):
    model, variables = tiny
    x = jax.random.normal(jax.random.key(2), (4, *SHAPE))
    full = np.asarray(model.apply(variables, x, 0, None, False))
    for k in model.spec.chokepoints:
        stem = basenet.select_layers(variables, model.spec, 0, k)
        branch = basenet.select_layers(variables, model.spec, k, model.spec.num_layers)
        h = model.apply(stem, x, 0, k, False)
        out = model.apply(branch, h, k, None, False)
        np.testing.assert_allclose(out, full, rtol=1e-5, atol=1e-5, err_msg=f"k={k}")


def test_layer_by_layer_equals_full_and_numpy_pool_head(tiny):
    model, variables = tiny
    x = jax.random.normal(jax.random.key(3), (3, *SHAPE))
    h = x
    spec = model.spec
    for i in range(spec.num_layers):
        h_next = model.apply(variables, h, i, i + 1, False)
        if spec.layers[i].kind == "pool":
            np.testing.assert_allclose(h_next, np.asarray(h).mean(axis=(1, 2)), rtol=1e-6)
        if spec.layers[i].kind == "head":
            p = variables["params"][spec.layer_names[i]]["head"]
            np.testing.assert_allclose(
                h_next, np.asarray(h) @ np.asarray(p["kernel"]) + np.asarray(p["bias"]),
                rtol=1e-5, atol=1e-6)
        h = h_next
    np.testing.assert_allclose(h, model.apply(variables, x, 0, None, False), rtol=1e-5,
                               atol=1e-6)


def test_bad_range_raises(tiny):
    model, variables = tiny
    with pytest.raises(ValueError, match="outside"):
        model.apply(variables, jnp.zeros((1, *SHAPE)), 3, 2, False)


def test_activation_shapes_and_bytes(tiny):
    model, variables = tiny
    shapes = basenet.activation_shapes(model, SHAPE)
    assert shapes[0] == SHAPE and shapes[1] == (4, 4, 4) and shapes[-1] == (3,)
    nbytes = basenet.layer_param_bytes(variables, model.spec)
    total = sum(np.asarray(a).nbytes for a in jax.tree.leaves(variables))
    assert nbytes.sum() == total
    assert nbytes[model.spec.layer_names.index("layer_05_pool")] == 0
