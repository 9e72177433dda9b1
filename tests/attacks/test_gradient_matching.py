"""Gradient matching (gitool.attacks.gradient_matching) on tiny models with known answers."""

from __future__ import annotations

import pytest
import torch

from gitool.attacks.gradient_matching import (
    ClientTraining,
    GradientMatcher,
    MatchConfig,
    labels_from_counts,
    paper_schedule,
    total_variation,
)
from gitool.capture import soft_cross_entropy
from gitool.attacks.errors import AttackError, InputError
from gitool.files import InputSpec
from gitool.metrics import psnr


def tiny_mlp(seed=0, hidden=32, classes=4, pixels=3 * 6 * 6):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(pixels, hidden), torch.nn.Sigmoid(),
                               torch.nn.Linear(hidden, classes))


def client_gradient(model, images, labels, spec):
    loss = soft_cross_entropy(model(spec.normalize(images)), labels)
    return dict(zip([n for n, _ in model.named_parameters()], torch.autograd.grad(loss, list(model.parameters()))))


SPEC = InputSpec(shape=(3, 6, 6), mean=(0.5,), std=(0.25,))


def test_total_variation_of_a_step_edge():
    image = torch.zeros(1, 1, 4, 4)
    image[..., 2:] = 1.0  # one vertical edge: 4 of the 12 horizontal neighbour pairs differ by 1
    assert float(total_variation(image)) == pytest.approx(4 / 12)


def test_paper_schedule_divides_lr_by_ten_at_3_5_and_7_eighths():
    param = torch.zeros(1, requires_grad=True)
    opt = torch.optim.Adam([param], lr=0.1)
    sched = paper_schedule(opt, 80)
    lrs = []
    for _ in range(80):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[29] == pytest.approx(0.1) and lrs[30] == pytest.approx(0.01)
    assert lrs[50] == pytest.approx(0.001) and lrs[70] == pytest.approx(0.0001)


def test_objective_is_zero_at_the_true_image_and_positive_elsewhere():
    model = tiny_mlp()
    images = torch.rand(1, 3, 6, 6)
    labels = torch.tensor([[0.7, 0.1, 0.1, 0.1]])
    target = client_gradient(model, images, labels, SPEC)
    for distance in ("cosine", "l2"):
        matcher = GradientMatcher(model, SPEC.normalize, target, ClientTraining("gradient", 1),
                                  MatchConfig(distance=distance, tv=0.0), labels=labels)
        assert float(matcher.objective(images, labels).detach()) == pytest.approx(0.0, abs=1e-6)
        assert float(matcher.objective(torch.rand(1, 3, 6, 6), labels).detach()) > 1e-3


def test_cosine_distance_is_the_weighted_inner_product_over_layers():
    model = tiny_mlp()
    target = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    weights = {"1.weight": 2.0, "3.bias": 0.5}
    matcher = GradientMatcher(model, SPEC.normalize, target, ClientTraining("gradient", 1),
                              MatchConfig(layer_weights=weights), labels=torch.full((1, 4), 0.25))
    dummy = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    w = {n: weights.get(n, 1.0) for n in dummy}
    dot = sum(w[n] * (dummy[n] * target[n]).sum() for n in dummy)
    nd = sum(w[n] * (dummy[n] ** 2).sum() for n in dummy).sqrt()
    nt = sum(w[n] * (target[n] ** 2).sum() for n in dummy).sqrt()
    assert float(matcher.gradient_distance(dummy)) == pytest.approx(float(1 - dot / (nd * nt)), rel=1e-5)


def test_recovers_a_recognisable_image_from_a_tiny_mlp_gradient():
    torch.set_num_threads(1)
    model = tiny_mlp()
    truth = torch.rand(1, 3, 6, 6, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([[0.85, 0.05, 0.05, 0.05]])
    target = client_gradient(model, truth, labels, SPEC)
    matcher = GradientMatcher(model, SPEC.normalize, target, ClientTraining("gradient", 1),
                              MatchConfig(iterations=300, tv=0.0, lr=0.1), labels=labels)
    out = matcher.run(SPEC.shape)
    assert float(psnr(out.images, truth)) > 40.0  # measured 106 dB (float32 exact; 41 dB after 100); random: 8 dB
    assert out.loss < 1e-3


def test_multi_step_update_is_simulated_like_the_client():
    """m = 2 local SGD steps with momentum and weight decay: the simulated delta at the
    true images equals the client's (gitool.capture.local_training)."""
    from gitool.capture import local_training
    from gitool.files import DefenceSpec, TrainingSpec

    model = tiny_mlp().to(torch.float64)
    images = torch.rand(4, 3, 6, 6, dtype=torch.float64)
    labels = torch.eye(4, dtype=torch.float64)
    training = TrainingSpec(batch_size=2, steps=2, lr=0.05, optimizer="momentum", momentum=0.9, weight_decay=1e-3)
    sent = local_training(model, SPEC.normalize(images), labels, training, DefenceSpec(), "delta",
                          torch.Generator()).values
    client = ClientTraining("delta", 2, 2, 0.05, "momentum", 0.9, 0.0, 1e-3)
    matcher = GradientMatcher(model, SPEC.normalize, sent, client, MatchConfig(tv=0.0), labels=labels)
    simulated, _ = matcher.simulated_update(SPEC.normalize(images), labels)
    for name, value in sent.items():
        torch.testing.assert_close(simulated[name], value, rtol=1e-10, atol=1e-12)


def test_joint_labels_learn_the_target_class():
    model = tiny_mlp()
    truth = torch.rand(1, 3, 6, 6, generator=torch.Generator().manual_seed(2))
    labels = torch.tensor([[0.0, 0.0, 1.0, 0.0]])
    target = client_gradient(model, truth, labels, SPEC)
    matcher = GradientMatcher(model, SPEC.normalize, target, ClientTraining("gradient", 1),
                              MatchConfig(iterations=200, tv=0.0, distance="l2"), labels=None, num_samples=1)
    out = matcher.run(SPEC.shape)
    assert int(out.labels.argmax()) == 2


def test_restarts_are_ranked_by_the_objective():
    model = tiny_mlp()
    truth = torch.rand(1, 3, 6, 6)
    labels = torch.tensor([[0.85, 0.05, 0.05, 0.05]])
    target = client_gradient(model, truth, labels, SPEC)
    matcher = GradientMatcher(model, SPEC.normalize, target, ClientTraining("gradient", 1),
                              MatchConfig(iterations=10, restarts=3, tv=0.0), labels=labels)
    out = matcher.run(SPEC.shape)
    assert len(out.restart_losses) == 3
    assert out.loss == min(out.restart_losses)
    assert float(matcher.objective(out.images, labels).detach()) == pytest.approx(out.loss, rel=1e-5)


def test_feature_term_and_f_terms_drop_the_last_weight():
    model = tiny_mlp()
    target = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    labels = torch.full((1, 4), 0.25)
    matcher = GradientMatcher(model, SPEC.normalize, target, ClientTraining("gradient", 1), MatchConfig(terms="f"),
                              labels=labels, features=torch.rand(1, 32))
    assert "3.weight" not in matcher.matched and "3.bias" in matcher.matched
    with pytest.raises(InputError, match="need the recovered last-layer features"):
        GradientMatcher(model, SPEC.normalize, target, ClientTraining("gradient", 1), MatchConfig(terms="gf"),
                        labels=labels)
    with pytest.raises(InputError, match="features have shape"):
        GradientMatcher(model, SPEC.normalize, target, ClientTraining("gradient", 1), MatchConfig(terms="gf"),
                        labels=labels, features=torch.rand(1, 31))
    with pytest.raises(InputError, match="labels have shape"):
        GradientMatcher(model, SPEC.normalize, target, ClientTraining("gradient", 1), MatchConfig(),
                        labels=torch.full((1, 5), 0.2))
    with pytest.raises(InputError, match="unknown distance"):
        GradientMatcher(model, SPEC.normalize, target, ClientTraining("gradient", 1), MatchConfig(distance="l1"),
                        labels=labels)


def test_labels_from_counts_expand_class_by_class_with_smoothing():
    rows = labels_from_counts(torch.tensor([0, 2, 1]), 3, label_smoothing_eps=0.3)
    expected = torch.tensor([[0.1, 0.8, 0.1], [0.1, 0.8, 0.1], [0.1, 0.1, 0.8]], dtype=torch.float64)
    torch.testing.assert_close(rows, expected)
    with pytest.raises(InputError, match="sum to 3"):
        labels_from_counts(torch.tensor([0, 2, 1]), 4)


def test_pruned_updates_match_only_the_kept_entries():
    model = tiny_mlp()
    target = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    target["1.weight"][:, :50] = 0  # the client zeroed these (top-k pruning)
    dummy = {n: t.clone() for n, t in target.items()}
    dummy["1.weight"][:, :50] = 5.0  # whatever the dummy has there must not count
    labels = torch.full((1, 4), 0.25)
    pruned = GradientMatcher(model, SPEC.normalize, target, ClientTraining("gradient", 1), MatchConfig(),
                             labels=labels, pruned=True)
    plain = GradientMatcher(model, SPEC.normalize, target, ClientTraining("gradient", 1), MatchConfig(),
                            labels=labels)
    assert float(pruned.gradient_distance(dummy)) == pytest.approx(0.0, abs=1e-6)
    assert float(plain.gradient_distance(dummy)) > 0.1


def test_a_diverged_run_is_a_clear_error():
    model = tiny_mlp()
    truth = torch.rand(1, 3, 6, 6)
    labels = torch.tensor([[0.85, 0.05, 0.05, 0.05]])
    target = client_gradient(model, truth, labels, SPEC)
    target["3.bias"][0] = float("nan")  # a corrupt update: every objective value is NaN
    matcher = GradientMatcher(model, SPEC.normalize, target, ClientTraining("gradient", 1),
                              MatchConfig(iterations=3, restarts=2, tv=0.0), labels=labels)
    with pytest.raises(AttackError, match="diverged"):
        matcher.run(SPEC.shape)
    with pytest.raises(InputError, match="finite"):
        MatchConfig(lr=float("inf")).validate()


# --------------------------------------------------------------------------- restarts together, stopping


def _matcher(restarts=3, iterations=30, joint=False, **config):
    model = tiny_mlp()
    truth = torch.rand(2, 3, 6, 6, generator=torch.Generator().manual_seed(3))
    labels = torch.tensor([[0.85, 0.05, 0.05, 0.05], [0.05, 0.05, 0.85, 0.05]])
    target = client_gradient(model, truth, labels, SPEC)
    return GradientMatcher(model, SPEC.normalize, target, ClientTraining("gradient", 2),
                           MatchConfig(iterations=iterations, restarts=restarts, **config),
                           labels=None if joint else labels, num_samples=2)


@pytest.mark.parametrize("joint", [False, True])
@pytest.mark.parametrize("signed", [False, True])
def test_restarts_together_equal_restarts_one_by_one(joint, signed, monkeypatch):
    together = _matcher(joint=joint, signed=signed)
    assert together.batchable()
    out = together.run(SPEC.shape)
    alone = _matcher(joint=joint, signed=signed)
    monkeypatch.setattr(alone, "batchable", lambda: False)
    reference = alone.run(SPEC.shape)
    # Same starts, same Adam: equal up to the order of float sums (measured within 1e-6).
    assert out.restart_losses == pytest.approx(reference.restart_losses, rel=1e-3, abs=1e-6)
    assert torch.allclose(out.images, reference.images, atol=1e-3)
    assert out.iterations_done == reference.iterations_done == 90
    assert out.loss == min(out.restart_losses)
    assert float(together.objective(out.images, out.labels).detach()) == pytest.approx(out.loss, rel=1e-4, abs=1e-7)


def test_restarts_together_give_the_same_bytes_for_the_same_seed():
    first, second = (_matcher(restarts=4, seed=7).run(SPEC.shape) for _ in range(2))
    assert first.images.numpy().tobytes() == second.images.numpy().tobytes()
    assert first.restart_losses == second.restart_losses


def test_only_elementwise_stateless_settings_run_together():
    assert not _matcher(restarts=1).batchable()
    assert not _matcher(optimizer="lbfgs").batchable()
    bn = _matcher()
    bn.model = torch.nn.Sequential(torch.nn.BatchNorm2d(3), bn.model).train()
    assert not bn.batchable()
    bn.model.eval()
    assert bn.batchable()


def test_a_large_model_runs_its_restarts_one_by_one(monkeypatch):
    import gitool.attacks.gradient_matching as gm

    matcher = _matcher()
    assert matcher.batchable()
    monkeypatch.setattr(gm, "TOGETHER_PARAMETER_LIMIT", 100)  # the tiny MLP has 3,588
    assert not matcher.batchable()


@pytest.mark.parametrize("restarts", [1, 3])
def test_should_stop_ends_the_run_with_the_best_iterate(restarts):
    matcher = _matcher(restarts=restarts, iterations=1000)
    calls = []

    def should_stop():
        calls.append(1)
        return "budget" if len(calls) >= 12 else None

    out = matcher.run(SPEC.shape, should_stop=should_stop)
    assert out.stopped == "budget" and out.iterations_done == 12 * restarts
    assert len(out.restart_losses) == restarts
    assert out.loss <= min(h[2] for h in out.history) + 1e-9  # never worse than a reported iterate
