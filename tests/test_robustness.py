"""Robust fusion (issue 10): screening on the calibration set, capped claims, no single client fails a round,
and error replies named by the node they are about.

Replies are faked as in tests/test_strategy.py: three honest clients learn three Gaussian blobs; a bad
client is one of them turned malicious.
"""

# ruff: noqa: F811  (the fixtures imported from tests.test_strategy are redefined as arguments)
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord
from torch import nn

import fedfuse.strategy.fedfuse as fedfuse_module
from fedfuse import FedFuse, FusionConfig, fuse
from fedfuse.fusion.calibration import CalibrationSet
from fedfuse.strategy.claims import cap_claims
from fedfuse.strategy.screening import ClientFigures, ScreeningRule, measure, screen
from tests.test_strategy import (  # noqa: F401  (fixtures shared with the strategy's tests)
    CLASSES,
    FakeGrid,
    blobs,
    calibration,
    client_states,
    flwr_log,
    make_net,
    reply,
    spy_on_fuse,
    task_identity,
    training_client,
    warnings_of,
)

BAD = 9


def scaled(state: dict[str, torch.Tensor], factor: float) -> dict[str, torch.Tensor]:
    return {key: value * factor for key, value in state.items()}


def noise(state: dict[str, torch.Tensor], seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {key: torch.randn(value.shape, generator=generator) for key, value in state.items()}


def trained_on(x: torch.Tensor, y: torch.Tensor, seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    model = make_net()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(30):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    return model.state_dict()


def dead_neuron_bomb(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An honest model plus a hidden neuron that never fires (on the calibration set or anywhere) but
    carries huge outgoing weights: every figure measured on the calibration set is the honest model's.
    Fused, it was regrouped with live neurons and woke (1e37 came back as 2.9e38)."""
    bomb = {key: value.clone() for key, value in state.items()}
    bomb["0.weight"][0] = 0.0
    bomb["0.bias"][0] = -1e3
    bomb["2.weight"][:, 0] = 1e30
    return bomb


def honest_replies(client_states) -> list:
    return [reply(node, state) for node, state in zip([1, 2, 3], client_states, strict=True)]


# --- screening: useless or out-of-line models are left out and named ----------------------------------


@pytest.mark.parametrize(
    ("attack", "reason"),
    [
        ("noise", "no better than chance"),
        ("sign-flip-x10", "output scale out of line"),
        ("x1e13", "output scale out of line"),
        ("x1e20", "non-finite activations"),
        ("flipped-labels", "no better than chance"),
        ("dead-neuron-bomb", "weights out of line: '2.weight' has norm"),
    ],
)
def test_a_bad_client_is_screened_out_named_with_its_figures_and_the_honest_ones_fused(
    attack, reason, calibration, client_states, monkeypatch, flwr_log
):
    x, y = blobs(96, seed=200)
    bad = {
        "noise": lambda: noise(client_states[0]),
        "sign-flip-x10": lambda: scaled(client_states[0], -10.0),
        "x1e13": lambda: scaled(client_states[0], 1e13),
        "x1e20": lambda: scaled(client_states[0], 1e20),
        "flipped-labels": lambda: trained_on(x, (y + 1) % CLASSES, seed=5),
        "dead-neuron-bomb": lambda: dead_neuron_bomb(client_states[0]),
    }[attack]()
    calls = spy_on_fuse(monkeypatch)
    strategy = FedFuse(make_net, calibration, fusion_config=FusionConfig(seed=0))

    arrays, metrics = strategy.aggregate_train(1, [*honest_replies(client_states), reply(BAD, bad)])

    assert arrays is not None and metrics["fusion-failed"] == 0
    assert calls[0]["parents"] == 3
    assert metrics["fusion-screened-out"] == 1 and metrics["fusion-screened-out-nodes"] == [BAD]
    (named,) = [w for w in warnings_of(flwr_log) if f"node {BAD} is screened out" in w]
    assert reason in named
    assert "loss" in named or "non-finite" in named


def test_an_honest_specialist_that_knows_two_of_the_three_classes_is_not_screened_out(
    calibration, client_states, flwr_log
):
    x, y = blobs(200, seed=300)
    known = y < 2
    specialist = trained_on(x[known], y[known], seed=6)
    strategy = FedFuse(make_net, calibration, fusion_config=FusionConfig(seed=0))

    _, metrics = strategy.aggregate_train(1, [*honest_replies(client_states), reply(BAD, specialist)])

    assert metrics["fusion-screened-out"] == 0 and metrics["fusion-clients"] == 4
    assert not any("screened out" in w for w in warnings_of(flwr_log))


def test_an_honest_client_that_saw_one_class_and_predicts_it_for_every_input_is_not_screened_out(
    calibration, client_states, flwr_log
):
    x, y = blobs(200, seed=301)
    one_class = trained_on(x[y == 0], y[y == 0], seed=7)
    (figures,) = measure(
        [_model(one_class)], [BAD], CalibrationSet(calibration, 64), CLASSES, ScreeningRule()
    )
    assert figures.accuracy == pytest.approx(float((calibration[1] == 0).float().mean()))  # always class 0
    assert figures.competence > 0.5  # yet its probability of class 0 is highest on class 0's samples

    strategy = FedFuse(make_net, calibration, fusion_config=FusionConfig(seed=0))
    _, metrics = strategy.aggregate_train(1, [*honest_replies(client_states), reply(BAD, one_class)])
    assert metrics["fusion-screened-out"] == 0 and metrics["fusion-clients"] == 4


def _model(state: dict[str, torch.Tensor]) -> nn.Module:
    model = make_net()
    model.load_state_dict(state)
    return model


def test_informedness_is_zero_for_a_model_that_ignores_its_input_whatever_class_it_favours(calibration):
    constant = make_net()
    with torch.no_grad():
        constant[2].weight.zero_()
        constant[2].bias.copy_(torch.tensor([0.0, 5.0, 0.0]))
    (figures,) = measure([constant], [7], CalibrationSet(calibration, 64), CLASSES, ScreeningRule())
    assert figures.accuracy == pytest.approx(float((calibration[1] == 1).float().mean()))
    np.testing.assert_allclose(figures.informedness, 0.0, atol=1e-12)
    assert figures.competence == pytest.approx(0.0)


def _figures(node: int, scale: float, competence: float = 0.9) -> ClientFigures:
    return ClientFigures(node, True, 0.5, 0.9, np.full(3, competence), np.ones(3), competence, scale)


def test_of_two_clients_only_the_inflated_one_is_out_of_line():
    screening = screen([_figures(1, 3.0), _figures(2, 3e13)], ScreeningRule())
    assert screening.kept == [0] and screening.left_out == [1]
    assert screening.reference_scale == pytest.approx(math.sqrt(3.0 * 3e13))  # the two's geometric mean


def test_the_scale_reference_is_the_median_of_the_competent_clients_so_useless_ones_cannot_set_it():
    useless = [_figures(node, 0.01, competence=0.0) for node in (4, 5, 6)]
    screening = screen([_figures(1, 3.0), _figures(2, 4.0), _figures(3, 5.0), *useless], ScreeningRule())
    assert screening.reference_scale == 4.0
    assert screening.left_out == [3, 4, 5]  # the useless, for being no better than chance, not the others


def test_half_the_clients_trained_far_less_cannot_put_the_other_half_out_of_line():
    weak = [_figures(node, 0.2, competence=0.5) for node in (4, 5, 6)]
    screening = screen([_figures(1, 3.0), _figures(2, 4.0), _figures(3, 5.0), *weak], ScreeningRule())
    assert screening.left_out == []


def test_half_the_clients_returning_the_untrained_global_model_do_not_screen_out_the_others(
    calibration, client_states, flwr_log
):
    untrained = make_net().state_dict()
    free_riders = [reply(node, untrained) for node in (7, 8, 9)]
    strategy = FedFuse(make_net, calibration, fusion_config=FusionConfig(seed=0))

    _, metrics = strategy.aggregate_train(1, [*honest_replies(client_states), *free_riders])

    assert not {1, 2, 3} & set(metrics["fusion-screened-out-nodes"])
    assert not any("out of line" in w for w in warnings_of(flwr_log))


def test_honest_clients_within_the_scale_ratio_and_small_scales_are_kept():
    figures = [_figures(1, 3.0), _figures(2, 9.0), _figures(3, 25.0), _figures(4, 0.01)]
    assert screen(figures, ScreeningRule()).left_out == []


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"min_competence": 1.5}, "min_competence"),
        ({"competent_classes": 0}, "competent_classes"),
        ({"min_recall": 0.0}, "min_recall"),
        ({"max_scale_ratio": 1.0}, "max_scale_ratio"),
    ],
)
def test_a_bad_screening_rule_is_refused_naming_its_parameter(options, message):
    with pytest.raises(ValueError, match=message):
        ScreeningRule(**options)


def test_screening_none_fuses_every_valid_client(calibration, client_states, monkeypatch):
    calls = spy_on_fuse(monkeypatch)
    strategy = FedFuse(make_net, calibration, screening=None)
    _, metrics = strategy.aggregate_train(
        1, [*honest_replies(client_states), reply(BAD, noise(client_states[0]))]
    )
    assert calls[0]["parents"] == 4 and metrics["fusion-screened-out"] == 0


# --- no single client can fail a round ----------------------------------------------------------------


def _engine_failing_with(is_culprit):
    """The real engine, except that it raises whenever a parent ``is_culprit``."""

    def engine(models, calibration, config=None, weights=None, levels=None):
        if any(is_culprit(model) for model in models):
            raise FloatingPointError("the fits overflowed")
        return fuse(models, calibration, config=config, weights=weights, levels=levels)

    return engine


def test_without_screening_a_failure_is_retried_without_the_clients_the_rule_flags_and_they_are_named(
    calibration, client_states, monkeypatch, flwr_log
):
    huge = lambda model: float(model[0].weight.detach().abs().max()) > 1e6  # noqa: E731
    monkeypatch.setattr(fedfuse_module, "fuse", _engine_failing_with(huge))
    strategy = FedFuse(make_net, calibration, screening=None)

    replies = [*honest_replies(client_states), reply(BAD, scaled(client_states[0], 1e13))]
    arrays, metrics = strategy.aggregate_train(1, replies)

    assert arrays is not None
    assert metrics["fusion-failed"] == 0 and metrics["fusion-failures"] == 1
    assert metrics["fusion-clients"] == 3 and metrics["fusion-failed-nodes"] == [BAD]
    warnings = warnings_of(flwr_log)
    assert any("fusing 4 clients" in w and "FloatingPointError" in w for w in warnings)
    assert any(f"the fusion failed because of node {BAD}; fused without it" in w for w in warnings)


def test_a_culprit_the_rule_does_not_flag_is_found_by_leaving_one_client_out_at_a_time(
    calibration, client_states, monkeypatch, flwr_log
):
    marker = client_states[1]["2.bias"].clone()
    is_second = lambda model: torch.equal(model[2].bias.detach(), marker)  # noqa: E731
    monkeypatch.setattr(fedfuse_module, "fuse", _engine_failing_with(is_second))
    strategy = FedFuse(make_net, calibration)

    arrays, metrics = strategy.aggregate_train(1, honest_replies(client_states))

    assert arrays is not None and metrics["fusion-failed"] == 0
    assert metrics["fusion-failed-nodes"] == [2] and metrics["fusion-clients"] == 2
    assert any("the fusion failed because of node 2" in w for w in warnings_of(flwr_log))


def test_only_an_engine_that_fails_on_every_subset_keeps_the_previous_model_returned_explicitly(
    task_identity, calibration, client_states, monkeypatch, flwr_log
):
    monkeypatch.setattr(fedfuse_module, "fuse", _engine_failing_with(lambda model: True))
    strategy = FedFuse(make_net, calibration)
    sent = ArrayRecord(make_net().state_dict())
    list(strategy.configure_train(1, sent, ConfigRecord(), FakeGrid(training_client).grid))

    arrays, metrics = strategy.aggregate_train(1, honest_replies(client_states))

    assert arrays is sent
    assert metrics["fusion-failed"] == 1 and metrics["fusion-failures"] == 4  # all three, then each pair
    assert any("the fusion engine failed on every subset" in w for w in warnings_of(flwr_log))


# --- claimed counts are capped ------------------------------------------------------------------------


def test_a_claim_above_four_times_the_median_is_capped_and_named(
    calibration, client_states, monkeypatch, flwr_log
):
    calls = spy_on_fuse(monkeypatch)
    strategy = FedFuse(make_net, calibration, parent_weights="num-examples")
    replies = [
        reply(n, s, {"num-examples": c}) for n, s, c in zip([1, 2, 3], client_states, [100, 1e308, 50])
    ]

    arrays, _ = strategy.aggregate_train(1, replies)

    assert arrays is not None
    assert sorted(calls[0]["weights"]) == pytest.approx([50 / 400, 100 / 400, 1.0])
    assert any(
        "node 2 claims 1e+308 examples, more than 4 times the median claim" in w
        for w in warnings_of(flwr_log)
    )


def test_two_clients_claiming_1e308_cannot_overflow_the_weights():
    capped = cap_claims(np.array([100, 120, 1e308, 1e308, 80, 90]), cap=4.0)
    assert np.isfinite(capped.weights).all() and capped.weights.max() == 1.0
    assert capped.capped == [2, 3] and capped.reference == pytest.approx(100)


def test_capped_label_counts_keep_their_proportions():
    counts = np.array([[10.0, 30.0, 0.0], [20.0, 20.0, 20.0], [1e12, 1e12, 1e12]])
    capped = cap_claims(counts, cap=4.0)
    assert capped.capped == [2]
    np.testing.assert_allclose(capped.weights[2], [1 / 3, 1 / 3, 1 / 3])  # 4 x 60, scaled to the largest
    np.testing.assert_allclose(capped.weights[0], [10 / 240, 30 / 240, 0.0])


def test_label_counts_of_the_wrong_length_leave_that_client_out_not_the_whole_rounds_weights(
    calibration, client_states, monkeypatch, flwr_log
):
    calls = spy_on_fuse(monkeypatch)
    strategy = FedFuse(make_net, calibration, parent_weights="label-counts")
    counts = [[30, 30, 40], [20, 50, 30], [10, 10, 10, 10]]
    replies = [
        reply(n, s, {"num-examples": 100, "label-counts": c})
        for n, s, c in zip([1, 2, 3], client_states, counts, strict=True)
    ]

    _, metrics = strategy.aggregate_train(1, replies)

    assert metrics["fusion-rejected"] == 1 and np.asarray(calls[0]["weights"]).shape == (2, 3)
    assert any(
        "node 3 is left out: 'label-counts' must hold one count per class (3), got 4" in w
        for w in warnings_of(flwr_log)
    )


# --- error replies Flower generates name the node they are about --------------------------------------


def test_an_error_reply_from_the_superlink_names_the_node_the_instruction_was_sent_to(
    task_identity, calibration, client_states, flwr_log
):
    strategy = FedFuse(make_net, calibration, fraction_evaluate=0.0)
    grid = FakeGrid(training_client, node_ids=(101, 102, 103))
    messages = list(
        strategy.configure_train(1, ArrayRecord(make_net().state_dict()), ConfigRecord(), grid.grid)
    )
    for index, message in enumerate(messages):  # what the grid does as it sends them
        message.metadata.__dict__["_message_id"] = f"instruction-{index}"
    dead = messages[1].metadata.dst_node_id
    unavailable = reply(1, None, error="Node Unavailable")  # from the SuperLink (node id 1) to itself
    unavailable.metadata.dst_node_id = 1
    unavailable.metadata.reply_to_message_id = "instruction-1"
    answers = [reply(101, client_states[0]), reply(103, client_states[2])]
    for answer, instruction in zip(answers, ("instruction-0", "instruction-2"), strict=True):
        answer.metadata.reply_to_message_id = instruction

    _, metrics = strategy.aggregate_train(1, [unavailable, *answers])

    assert any(f"node {dead} is left out: it replied with an error" in w for w in warnings_of(flwr_log))
    assert not any("node 1 is left out" in w for w in warnings_of(flwr_log))
    assert metrics["fusion-clients"] == 2


def test_a_node_that_replies_twice_is_fused_once_and_the_repeat_named(calibration, client_states, flwr_log):
    strategy = FedFuse(make_net, calibration)
    replies = [*honest_replies(client_states), reply(1, client_states[0]), reply(1, client_states[1])]

    _, metrics = strategy.aggregate_train(1, replies)

    assert metrics["fusion-clients"] == 3 and metrics["fusion-rejected"] == 2
    repeats = [w for w in warnings_of(flwr_log) if "a reply of node 1 is left out" in w]
    assert len(repeats) == 2 and "replied more than once" in repeats[0]


def test_a_reply_that_answers_no_instruction_of_the_round_is_left_out_and_named(
    task_identity, calibration, client_states, flwr_log
):
    strategy = FedFuse(make_net, calibration, fraction_evaluate=0.0)
    grid = FakeGrid(training_client, node_ids=(101, 102))
    messages = list(
        strategy.configure_train(1, ArrayRecord(make_net().state_dict()), ConfigRecord(), grid.grid)
    )
    for index, message in enumerate(messages):  # what the grid does as it sends them
        message.metadata.__dict__["_message_id"] = f"instruction-{index}"
    answers = [reply(101, client_states[0]), reply(102, client_states[1]), reply(901, client_states[2])]
    for answer, instruction in zip(answers, ("instruction-0", "instruction-1", "elsewhere"), strict=True):
        answer.metadata.reply_to_message_id = instruction

    _, metrics = strategy.aggregate_train(1, answers)

    assert metrics["fusion-clients"] == 2 and metrics["fusion-rejected"] == 1
    assert any(
        "node 901 is left out: its reply answers no training instruction" in w for w in warnings_of(flwr_log)
    )


def test_the_same_model_sent_by_several_nodes_counts_once_and_the_copies_are_named(
    calibration, client_states, flwr_log, monkeypatch
):
    calls = spy_on_fuse(monkeypatch)
    strategy = FedFuse(make_net, calibration, fusion_config=FusionConfig(seed=0))
    sybils = [reply(node, scaled(client_states[2], 3.0)) for node in (7, 8, 9)]

    _, metrics = strategy.aggregate_train(1, [*honest_replies(client_states), *sybils])

    assert metrics["fusion-duplicate-nodes"] == [8, 9] and calls[0]["parents"] == 4
    assert any("node 9 is left out: its model is identical to node 7's" in w for w in warnings_of(flwr_log))
