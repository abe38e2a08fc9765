"""sb_jax.analysis: time-to-target summaries and where the mislabeled examples sit."""

from __future__ import annotations

import numpy as np
import pytest

from sb_jax import analysis


def reference_auc(scores, positive):
    """P(score of a positive > score of a negative) + 0.5 P(tie), by all pairs."""
    pos, neg = scores[positive], scores[~positive]
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return wins / (len(pos) * len(neg))


@pytest.mark.parametrize("seed", [0, 1])
def test_noise_by_loss_percentile_matches_loops(seed):
    rng = np.random.default_rng(seed)
    n = 300
    noisy = rng.random(n) < 0.2
    # Mislabeled examples get higher losses on average; rounding makes ties.
    losses = np.round(rng.exponential(size=n) + 2.0 * noisy, 1)
    rank = rng.integers(0, 4, n)
    edges = [0.0, 0.5, 0.8, 1.0]  # the top ranges hold both kinds, the bottom may not
    rows = analysis.noise_by_loss_percentile(losses, rank, noisy, edges)
    pct = np.array([np.sum(losses < v) / n for v in losses])
    assert sum(r["count"] for r in rows) == n
    assert sum(r["loss_auc"] is not None for r in rows) >= 2
    for j, row in enumerate(rows):
        lo, hi = edges[j], edges[j + 1]
        inside = np.array([lo <= p < hi or (j == len(rows) - 1 and p == hi) for p in pct])
        assert row["count"] == inside.sum()
        assert row["mislabeled_share"] == pytest.approx(noisy[inside].mean())
        if 0 < noisy[inside].sum() < inside.sum():
            assert row["loss_auc"] == pytest.approx(
                reference_auc(losses[inside], noisy[inside]))
        else:
            assert row["loss_auc"] is None
        for r, entry in row["by_label_rank"].items():
            sel = inside & (rank == r)
            assert entry["count"] == sel.sum()
            assert entry["mislabeled_share"] == pytest.approx(noisy[sel].mean())


def test_noise_by_loss_percentile_one_kind_has_no_auc():
    rows = analysis.noise_by_loss_percentile([1.0, 2.0, 3.0], [0, 0, 1],
                                             [False, False, False], [0, 1])
    assert rows[0]["loss_auc"] is None and rows[0]["mislabeled_share"] == 0.0


@pytest.mark.parametrize("edges, match", [
    ([0.5], "edges must be"), ([0.0, 0.8, 0.5], "edges must be"), ([0.0, 1.5], "edges must be"),
])
def test_noise_by_loss_percentile_rejects_bad_edges(edges, match):
    with pytest.raises(ValueError, match=match):
        analysis.noise_by_loss_percentile([1.0, 2.0], [0, 0], [False, True], edges)


def test_noise_by_loss_percentile_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match="must all be"):
        analysis.noise_by_loss_percentile([1.0, 2.0], [0], [False, True], [0, 1])
