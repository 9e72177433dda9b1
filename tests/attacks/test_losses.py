from __future__ import annotations

import torch

from gitool.attacks.losses import smooth_labels, soft_cross_entropy


def test_smooth_labels_one_eps_or_one_per_row():
    one_hot = torch.eye(4, dtype=torch.float64)[[2, 0]]
    same = smooth_labels(one_hot, 0.2)
    assert torch.allclose(same[0], torch.tensor([0.05, 0.05, 0.85, 0.05], dtype=torch.float64))
    per_row = smooth_labels(one_hot, torch.tensor([0.2, 0.0], dtype=torch.float64))
    assert torch.equal(per_row[1], one_hot[1]) and torch.allclose(per_row[0], same[0])
    assert torch.allclose(per_row.sum(1), torch.ones(2, dtype=torch.float64))


def test_soft_cross_entropy_of_one_hot_is_the_usual_loss():
    logits = torch.randn(3, 5, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([4, 0, 2])
    expected = torch.nn.functional.cross_entropy(logits, labels)
    assert torch.allclose(soft_cross_entropy(logits, torch.eye(5)[labels]), expected)
