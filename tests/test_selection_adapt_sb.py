"""AdaptSB against a slow NumPy reference, its budget, its adaptation and its checkpoint."""

from __future__ import annotations

import collections

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy import optimize, stats

from sb_jax.checkpointing import Checkpointer
from sb_jax.selection import ChunkScores, adapt_sb, head_gradient, make_policy
from sb_jax.selection.adapt_sb import alignment_terms, project_to_budget, sb_bin_priorities

NUM_CLASSES = 3
FEATURES = 5


@pytest.fixture(autouse=True)
def fresh_trace_counter():
    """assert_max_traces counts per source text: policies sharing a body share a count."""
    chex.clear_trace_counter()


def jit_policy(policy):
    return policy._replace(select=jax.jit(policy.select))


# --- NumPy references ---------------------------------------------------------------------


def reference_sb_bins(beta, num_bins, points=20000):
    """Mean of pct**beta over each bin by the midpoint rule (no closed form)."""
    edges = np.arange(num_bins + 1) / num_bins
    out = []
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        mids = lo + (np.arange(points) + 0.5) * (hi - lo) / points
        out.append(np.mean(mids**beta))
    return np.array(out)


def reference_project(weights, budget, floor, occupancy=None):
    """clip(c w, floor, 1) with sum(occupancy q) = budget, c by Brent's method in float64."""
    weights = np.asarray(weights, np.float64)
    if occupancy is None:
        occupancy = np.full(len(weights), 1.0 / len(weights))

    def excess(log_c):
        return np.sum(occupancy * np.clip(np.exp(log_c) * weights, floor, 1.0)) - budget

    lo = np.log(floor / weights.max()) - 1.0
    hi = np.log(1.0 / weights.min()) + 1.0
    log_c = optimize.brentq(excess, lo, hi, xtol=1e-14)
    return np.clip(np.exp(log_c) * weights, floor, 1.0)


def reference_gradients(logits, features, labels):
    """Per-example last-layer gradients as explicit [D + 1, K] outer products."""
    logits = np.asarray(logits, np.float64)
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    residual = p - np.eye(logits.shape[1])[np.asarray(labels)]
    inputs = np.concatenate([np.asarray(features, np.float64), np.ones((len(labels), 1))], 1)
    return np.einsum("nd,nk->ndk", inputs, residual)


class ReferenceAdaptSB:
    """AdaptSB written the obvious way: loops, float64, explicit gradients."""

    def __init__(self, beta, num_bins, step_size, update_every, floor, prior_pull, signal,
                 history_size, split_by_alignment=False):
        self.beta, self.num_bins, self.step_size = beta, num_bins, step_size
        self.update_every, self.floor, self.prior_pull = update_every, floor, prior_pull
        self.signal_kind, self.split = signal, split_by_alignment
        self.num_classes = num_bins * (2 if split_by_alignment else 1)
        self.budget = 1.0 / (beta + 1.0)
        self.history = collections.deque(maxlen=history_size)
        prior = np.maximum(reference_sb_bins(beta, num_bins), floor)
        prior = np.concatenate([prior] * (self.num_classes // num_bins))
        self.q = reference_project(prior, self.budget, floor)
        self.log_prior = np.log(self.q)
        self.occupancy = np.full(self.num_classes, 1.0 / self.num_classes)
        self.signal = np.zeros(self.num_classes)
        self._reset()

    def _reset(self):
        self.align = np.zeros(self.num_classes)
        self.grad_sq = np.zeros(self.num_classes)
        self.count = np.zeros(self.num_classes)
        self.window = 0

    def bins(self, losses, valid):
        for loss, ok in zip(np.asarray(losses, np.float32), valid, strict=True):
            if ok:
                self.history.append(loss)
        h = np.array(self.history, np.float32)
        pct = np.array([np.sum(h < loss) / max(len(h), 1) for loss in losses], np.float64)
        return np.minimum(np.floor(pct * self.num_bins).astype(int), self.num_bins - 1)

    def select(self, scores: ChunkScores, draws):
        valid = np.asarray(scores.valid)
        classes = self.bins(scores.losses, valid)
        grads = reference_gradients(scores.logits, scores.features, scores.labels)
        big_g = np.asarray(scores.heldout_grad, np.float64)
        align = np.einsum("ndk,dk->n", grads, big_g) / np.linalg.norm(big_g)
        if self.split:
            classes = classes + self.num_bins * (align < 0)
        chosen = np.flatnonzero(valid & (draws < self.q[classes]))
        for i in np.flatnonzero(valid & np.asarray(scores.scored)):
            self.align[classes[i]] += align[i]
            self.grad_sq[classes[i]] += np.sum(grads[i] ** 2)
            self.count[classes[i]] += 1
        self.window += 1
        if self.window == self.update_every:
            self._update()
        return chosen

    def _update(self):
        s = np.zeros(self.num_classes)
        seen = self.count > 0
        mean_align = self.align[seen] / self.count[seen]
        if self.signal_kind == "cosine":
            s[seen] = mean_align / np.sqrt(self.grad_sq[seen] / self.count[seen])
        else:
            s[seen] = mean_align / np.max(np.abs(mean_align))
        if self.split:
            self.occupancy = 0.5 * self.occupancy + 0.5 * self.count / self.count.sum()
        theta = np.log(self.q)
        theta = theta + self.step_size * s - self.prior_pull * (theta - self.log_prior)
        self.q = reference_project(np.exp(theta), self.budget, self.floor, self.occupancy)
        self.signal = s
        self._reset()


# --- Synthetic chunks ---------------------------------------------------------------------


def random_chunk(rng, size, heldout_grad, *, start=0, valid_fraction=1.0, losses=None):
    valid = rng.random(size) < valid_fraction
    if losses is None:
        losses = rng.lognormal(size=size)
    return ChunkScores(
        ids=jnp.arange(start, start + size, dtype=jnp.int32),
        valid=jnp.asarray(valid),
        scored=jnp.asarray(valid),
        losses=jnp.asarray(np.where(valid, losses, 0.0), jnp.float32),
        logits=jnp.asarray(rng.normal(size=(size, NUM_CLASSES)), jnp.float32),
        labels=jnp.asarray(rng.integers(0, NUM_CLASSES, size), jnp.int32),
        features=jnp.asarray(rng.normal(size=(size, FEATURES)), jnp.float32),
        heldout_grad=jnp.asarray(heldout_grad, jnp.float32),
    )


def noise_bin_chunk(rng, size, u, v, noise_threshold):
    """Lognormal losses; the examples above ``noise_threshold`` act as mislabeled.

    The held-out gradient is ``G = outer(u, v)`` with ``v = e1 - e0``, and an example's
    gradient is ``outer([f, 1], r)``, so ``<g, G> = ([f, 1].u) (r.v)``. Features are u
    plus noise (``[f, 1].u > 0``); the logits put most mass on class 2, so
    ``r = softmax - onehot(label)`` has ``r.v = +1`` for label 0 (clean: helps the
    held-out loss) and ``-1`` for label 1 (mislabeled: hurts it).
    """
    losses = rng.lognormal(size=size)
    labels = np.where(losses > noise_threshold, 1, 0)
    logits = np.zeros((size, NUM_CLASSES))
    logits[:, 2] = 3.0
    features = u[:-1][None, :] + 0.3 * rng.normal(size=(size, FEATURES))
    return ChunkScores(
        ids=jnp.arange(size, dtype=jnp.int32),
        valid=jnp.ones(size, bool),
        scored=jnp.ones(size, bool),
        losses=jnp.asarray(losses, jnp.float32),
        logits=jnp.asarray(logits, jnp.float32),
        labels=jnp.asarray(labels, jnp.int32),
        features=jnp.asarray(features, jnp.float32),
        heldout_grad=jnp.asarray(np.outer(u, v), jnp.float32),
    )


def uniforms(key, counter, size):
    return np.asarray(jax.random.uniform(jax.random.fold_in(key, counter), (size,), jnp.float32))


def selected_positions(selection):
    valid = np.asarray(selection.valid)
    count = int(valid.sum())
    assert valid[:count].all() and not valid[count:].any()
    return np.asarray(selection.indices)[:count]


# --- Tests --------------------------------------------------------------------------------


@pytest.mark.parametrize("beta", [0.5, 1.0, 2.0, 3.7])
@pytest.mark.parametrize("num_bins", [2, 8, 13])
def test_sb_bin_priorities_are_sbs_curve_averaged(beta, num_bins):
    curve = sb_bin_priorities(beta, num_bins)
    np.testing.assert_allclose(curve, reference_sb_bins(beta, num_bins), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(curve.mean(), 1.0 / (beta + 1.0), rtol=1e-12)


@pytest.mark.parametrize("seed", range(6))
def test_project_to_budget_matches_reference(seed):
    rng = np.random.default_rng(seed)
    size = int(rng.integers(2, 12))
    weights = np.exp(rng.normal(scale=2.0, size=size))
    budget = float(rng.uniform(0.1, 0.6))
    floor = float(rng.uniform(0.001, budget * 0.9))
    occupancy = rng.dirichlet(np.ones(size)) if seed % 2 else None
    got = np.asarray(project_to_budget(
        jnp.log(jnp.asarray(weights)), budget, floor,
        None if occupancy is None else jnp.asarray(occupancy, jnp.float32),
    ))
    np.testing.assert_allclose(got, reference_project(weights, budget, floor, occupancy),
                               rtol=2e-5, atol=1e-6)
    expected_fraction = got.mean() if occupancy is None else np.sum(occupancy * got)
    np.testing.assert_allclose(expected_fraction, budget, rtol=1e-5)
    assert got.min() >= floor - 1e-7 and got.max() <= 1.0


def test_alignment_terms_match_explicit_gradients():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(7, NUM_CLASSES))
    features = rng.normal(size=(7, FEATURES))
    labels = rng.integers(0, NUM_CLASSES, 7)
    big_g = rng.normal(size=(FEATURES + 1, NUM_CLASSES))
    alignment, grad_sq = alignment_terms(
        jnp.asarray(logits, jnp.float32), jnp.asarray(features, jnp.float32),
        jnp.asarray(labels), jnp.asarray(big_g, jnp.float32),
    )
    grads = reference_gradients(logits, features, labels)
    np.testing.assert_allclose(
        alignment, np.einsum("ndk,dk->n", grads, big_g) / np.linalg.norm(big_g), rtol=1e-5,
        atol=1e-6,
    )
    np.testing.assert_allclose(grad_sq, np.sum(grads**2, axis=(1, 2)), rtol=1e-5)
    # A zero held-out gradient (not computed yet) aligns with nothing.
    zero, _ = alignment_terms(
        jnp.asarray(logits), jnp.asarray(features), jnp.asarray(labels),
        jnp.zeros((FEATURES + 1, NUM_CLASSES)),
    )
    np.testing.assert_array_equal(zero, 0.0)


def test_head_gradient_is_the_autodiff_gradient_of_the_head():
    rng = np.random.default_rng(2)
    features = jnp.asarray(rng.normal(size=(9, FEATURES)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, NUM_CLASSES, 9))
    weights = jnp.asarray(rng.random(9) < 0.6, jnp.float32)
    head = nn.Dense(NUM_CLASSES)
    params = head.init(jax.random.key(0), features)["params"]

    def mean_loss(params):
        logits = head.apply({"params": params}, features)
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        return jnp.sum(losses * weights) / jnp.sum(weights)

    grads = jax.grad(mean_loss)(params)
    logits = head.apply({"params": params}, features)
    got = head_gradient(logits, features, labels, weights)
    np.testing.assert_allclose(got[:-1], grads["kernel"], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(got[-1], grads["bias"], rtol=1e-5, atol=1e-7)


def test_state_shapes_and_initial_priorities():
    policy = adapt_sb(beta=2.0, num_bins=8, history_size=64, batch_size=16, floor=0.02)
    assert policy.needs_features and policy.needs_heldout_grad
    state = policy.init(100, jax.random.key(0))
    chex.assert_shape(
        [state.priorities, state.alignment_sum, state.grad_sq_sum, state.count, state.signal],
        (8,),
    )
    chex.assert_shape([state.counter, state.window_chunks, state.num_updates], ())
    chex.assert_shape(state.history.values, (64,))
    assert state.priorities.dtype == jnp.float32 and state.counter.dtype == jnp.int32
    prior = np.maximum(reference_sb_bins(2.0, 8), 0.02)
    np.testing.assert_allclose(state.priorities, reference_project(prior, 1 / 3, 0.02),
                               rtol=1e-5)
    assert set(policy.diagnostics(state)) == {"priorities", "priority_signal"}
    split = adapt_sb(beta=2.0, num_bins=8, history_size=64, batch_size=16,
                     split_by_alignment=True)
    state = split.init(100, jax.random.key(0))
    chex.assert_shape([state.priorities, state.occupancy, state.count], (16,))
    np.testing.assert_allclose(state.priorities[:8], state.priorities[8:])
    assert "class_occupancy" in split.diagnostics(state)


@pytest.mark.parametrize("signal,split", [("cosine", False), ("dot", False), ("cosine", True)])
def test_select_and_update_match_numpy_reference(signal, split):
    hyper = dict(beta=1.5, num_bins=8, step_size=0.7, update_every=3, floor=0.02,
                 prior_pull=0.1, signal=signal, history_size=40, split_by_alignment=split)
    policy = jit_policy(adapt_sb(batch_size=16, prime_epochs=0, **hyper))
    reference = ReferenceAdaptSB(**hyper)
    key = jax.random.key(5)
    state = policy.init(200, key)
    rng = np.random.default_rng(3)
    big_g = rng.normal(size=(FEATURES + 1, NUM_CLASSES))
    for counter in range(10):
        scores = random_chunk(rng, 16, big_g, valid_fraction=0.8)
        selection, state = policy.select(scores, state, jnp.int32(0))
        expected = reference.select(scores, uniforms(key, counter, 16))
        np.testing.assert_array_equal(selected_positions(selection), expected)
        np.testing.assert_allclose(state.priorities, reference.q, rtol=2e-4, atol=1e-6)
        np.testing.assert_allclose(state.signal, reference.signal, rtol=2e-4, atol=2e-6)
        np.testing.assert_allclose(state.occupancy, reference.occupancy, rtol=1e-5)
    assert int(state.num_updates) == 3
    assert not np.allclose(state.priorities, policy.init(200, key).priorities, atol=1e-3)


@pytest.mark.parametrize("beta,split", [(1.0, False), (2.0, False), (3.0, False), (2.0, True)])
def test_budget_is_kept_while_priorities_move(beta, split):
    """A fixed loss stream, a strong update: the selected fraction stays 1/(beta+1)."""
    policy = jit_policy(adapt_sb(beta=beta, batch_size=64, history_size=256, update_every=2,
                                 step_size=1.0, prior_pull=0.0, prime_epochs=0,
                                 split_by_alignment=split))
    state = policy.init(64, jax.random.key(int(beta)))
    initial = np.asarray(state.priorities)
    rng = np.random.default_rng(int(beta))
    big_g = rng.normal(size=(FEATURES + 1, NUM_CLASSES))
    selected = seen = 0
    for _ in range(250):
        scores = random_chunk(rng, 64, big_g)
        selection, state = policy.select(scores, state, jnp.int32(0))
        selected += int(selection.valid.sum())
        seen += 64
    assert abs(selected / seen - 1.0 / (beta + 1.0)) < 0.03
    assert np.max(np.abs(np.asarray(state.priorities) - initial)) > 0.05  # It did adapt.
    expected_fraction = np.sum(np.asarray(state.occupancy) * np.asarray(state.priorities))
    np.testing.assert_allclose(expected_fraction, 1.0 / (beta + 1.0), rtol=1e-5)


@pytest.mark.parametrize("signal", ["cosine", "dot"])
def test_noise_bin_loses_priority_and_the_others_gain(signal):
    """The highest-loss eighth of the stream has gradients opposed to the held-out one."""
    num_bins, beta = 8, 2.0
    # A long history keeps the top bin's edge precise, so bin 6 holds few noisy examples.
    policy = jit_policy(adapt_sb(beta=beta, num_bins=num_bins, batch_size=64,
                                 history_size=2048, update_every=2, signal=signal,
                                 prime_epochs=0))
    state = policy.init(64, jax.random.key(0))
    initial = np.asarray(state.priorities)
    rng = np.random.default_rng(0)
    u = np.concatenate([rng.normal(size=FEATURES), [1.0]])
    v = np.array([-1.0, 1.0, 0.0])
    threshold = float(np.exp(stats.norm.ppf(1.0 - 1.0 / num_bins)))  # Top bin's edge.
    for _ in range(300):
        scores = noise_bin_chunk(rng, 64, u, v, threshold)
        _, state = policy.select(scores, state, jnp.int32(0))
    final = np.asarray(state.priorities)
    assert final[-1] < 0.5 * initial[-1], (initial, final)
    assert np.all(final[:-1] > initial[:-1]), (initial, final)
    assert np.asarray(state.signal)[-1] < 0 < np.min(np.asarray(state.signal)[:-1])
    np.testing.assert_allclose(final.mean(), 1.0 / (beta + 1.0), rtol=1e-5)


def test_priming_keeps_everything_and_learns_nothing():
    policy = jit_policy(adapt_sb(beta=2.0, batch_size=16, history_size=32, update_every=1,
                                 prime_epochs=1))
    state = policy.init(64, jax.random.key(0))
    rng = np.random.default_rng(0)
    scores = random_chunk(rng, 16, rng.normal(size=(FEATURES + 1, NUM_CLASSES)),
                          valid_fraction=0.7)
    selection, new = policy.select(scores, state, jnp.int32(0))
    np.testing.assert_array_equal(selected_positions(selection),
                                  np.flatnonzero(np.asarray(scores.valid)))
    for field in ("priorities", "count", "window_chunks", "num_updates", "history"):
        chex.assert_trees_all_equal(getattr(new, field), getattr(state, field))
    _, after = policy.select(scores, new, jnp.int32(1))
    assert int(after.num_updates) == 1


def test_zero_step_size_keeps_the_prior():
    policy = jit_policy(adapt_sb(beta=2.0, batch_size=16, history_size=32, update_every=1,
                                 step_size=0.0, prime_epochs=0))
    state = policy.init(64, jax.random.key(0))
    initial = np.asarray(state.priorities)
    rng = np.random.default_rng(0)
    big_g = rng.normal(size=(FEATURES + 1, NUM_CLASSES))
    for _ in range(5):
        _, state = policy.select(random_chunk(rng, 16, big_g), state, jnp.int32(0))
    np.testing.assert_allclose(state.priorities, initial, rtol=1e-5)


def test_checkpoint_round_trip(tmp_path):
    policy = jit_policy(adapt_sb(beta=1.0, batch_size=16, history_size=32, update_every=2,
                                 prime_epochs=0))
    state = policy.init(64, jax.random.key(3))
    rng = np.random.default_rng(0)
    big_g = rng.normal(size=(FEATURES + 1, NUM_CLASSES))
    for _ in range(5):  # Mid-window: the accumulators are non-zero too.
        _, state = policy.select(random_chunk(rng, 16, big_g), state, jnp.int32(0))
    assert int(state.window_chunks) == 1 and int(state.num_updates) == 2
    checkpointer = Checkpointer(str(tmp_path / "ckpt"))
    checkpointer.save(1, {"policy_state": state}, {"wall_s": 0.0})
    abstract = jax.eval_shape(lambda: {"policy_state": policy.init(64, jax.random.key(0))})
    restored, epoch, _ = checkpointer.restore_latest(abstract)
    checkpointer.close()
    assert epoch == 1
    chex.assert_trees_all_equal(restored["policy_state"], state)
    scores = random_chunk(rng, 16, big_g)
    a, state_a = policy.select(scores, state, jnp.int32(0))
    b, state_b = policy.select(scores, restored["policy_state"], jnp.int32(0))
    chex.assert_trees_all_equal((a, state_a), (b, state_b))


def test_select_traced_once():
    policy = adapt_sb(beta=2.0, batch_size=16, history_size=32, update_every=2)
    select = jax.jit(chex.assert_max_traces(policy.select, n=1))
    state = policy.init(64, jax.random.key(0))
    rng = np.random.default_rng(0)
    big_g = rng.normal(size=(FEATURES + 1, NUM_CLASSES))
    for epoch in range(3):
        for _ in range(3):
            _, state = select(random_chunk(rng, 16, big_g), state, jnp.int32(epoch))


def test_missing_features_is_a_clear_error():
    policy = adapt_sb(beta=2.0, batch_size=4, history_size=8)
    state = policy.init(8, jax.random.key(0))
    scores = random_chunk(np.random.default_rng(0), 4, np.ones((FEATURES + 1, NUM_CLASSES)))
    with pytest.raises(ValueError, match="needs ChunkScores.features"):
        policy.select(scores._replace(features=None), state, jnp.int32(1))


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(beta=0.0), "beta must be a finite number > 0"),
        (dict(beta=2.0, num_bins=1), "num_bins must be an integer >= 2"),
        (dict(beta=2.0, num_bins=4.5), "num_bins must be an integer >= 2"),
        (dict(beta=2.0, step_size=-0.1), "step_size must be a finite number >= 0"),
        (dict(beta=2.0, step_size=float("nan")), "step_size must be a finite number >= 0"),
        (dict(beta=2.0, update_every=0), "update_every must be an integer >= 1"),
        (dict(beta=2.0, floor=0.0), r"floor must be a number in \(0, 1/\(beta\+1\)\)"),
        (dict(beta=2.0, floor=0.34), r"floor must be a number in \(0, 1/\(beta\+1\)\)"),
        (dict(beta=2.0, prior_pull=1.0), r"prior_pull must be a number in \[0, 1\)"),
        (dict(beta=2.0, signal="norm"), r"signal must be one of \['cosine', 'dot'\]"),
        (dict(beta=2.0, split_by_alignment="yes"), "split_by_alignment must be True or False"),
        (dict(beta=2.0, history_size=0), "history_size must be an integer >= 1"),
        (dict(beta=2.0, batch_size=0), "batch_size must be an integer >= 1"),
        (dict(beta=2.0, prime_epochs=-1), "prime_epochs must be an integer >= 0"),
    ],
)
def test_bad_hyperparameters_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_policy("adapt_sb", **kwargs)
