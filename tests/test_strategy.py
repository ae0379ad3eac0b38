"""FedFuse, the Flower strategy: fusion of valid replies, faults, metrics, dtypes, determinism, start().

Replies are faked with ``Mock(spec=Message)``, as Flower's own strategy tests do: a real ``Message``
can only be built inside a running app. The tests of ``start()`` run it against a fake Grid that
plays the clients.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Iterator
from unittest.mock import Mock, PropertyMock

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.supercore.task_identity import TaskIdentity
from torch import nn

import fedfuse.strategy.fedfuse as fedfuse_module
from fedfuse import FedFuse, FusionConfig, fuse

FEATURES, HIDDEN, CLASSES = 8, 12, 3


def make_net() -> nn.Sequential:
    return nn.Sequential(nn.Linear(FEATURES, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, CLASSES))


def blobs(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Three well-separated Gaussian blobs: a task any client learns in a few steps."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.eye(CLASSES, FEATURES) * 4.0
    y = torch.randint(0, CLASSES, (n,), generator=generator)
    return centres[y] + torch.randn(n, FEATURES, generator=generator), y


def trained_state(seed: int, start: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """A client's model after local training on its own blob sample (from ``start``, or fresh)."""
    torch.manual_seed(seed)
    model = make_net()
    if start is not None:
        model.load_state_dict(start)
    x, y = blobs(96, seed=100 + seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(30):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    return model.state_dict()


def reply(
    node_id: int,
    state: dict[str, torch.Tensor] | ArrayRecord | None,
    metrics: dict | None = None,
    *,
    error: str | None = None,
    extra_records: dict | None = None,
) -> Mock:
    """A fake training reply as a ClientApp sends it: ``{"arrays": ..., "metrics": ...}``."""
    message = Mock(spec=Message)
    message.metadata.src_node_id = node_id
    message.has_error.return_value = error is not None
    message.error = Mock(code=0, reason=error)
    content = {}
    if state is not None:
        content["arrays"] = state if isinstance(state, ArrayRecord) else ArrayRecord(state)
    content["metrics"] = MetricRecord(
        {"num-examples": 100, "train-loss": 0.5} if metrics is None else metrics
    )
    content.update(extra_records or {})
    message.content = RecordDict(content)
    return message


@pytest.fixture(scope="module")
def calibration() -> tuple[torch.Tensor, torch.Tensor]:
    return blobs(120, seed=7)


@pytest.fixture(scope="module")
def client_states() -> list[dict[str, torch.Tensor]]:
    return [trained_state(seed) for seed in range(3)]


@pytest.fixture
def strategy(calibration) -> FedFuse:
    return FedFuse(model_fn=make_net, calibration=calibration, fusion_config=FusionConfig(seed=0))


@pytest.fixture
def flwr_log(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO, logger="flwr")
    return caplog


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "flwr" and r.levelno == logging.WARNING]


def accuracy(record: ArrayRecord, x: torch.Tensor, y: torch.Tensor) -> float:
    model = make_net()
    model.load_state_dict(record.to_torch_state_dict())
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


# --- the drop-in swap ------------------------------------------------------------------------------


def test_fedfuse_is_a_fedavg_importable_from_the_package_and_takes_every_fedavg_argument(calibration):
    strategy = FedFuse(
        make_net,
        calibration,
        fraction_train=0.5,
        fraction_evaluate=0.25,
        min_train_nodes=3,
        min_evaluate_nodes=4,
        min_available_nodes=5,
        weighted_by_key="n",
        arrayrecord_key="model",
        configrecord_key="cfg",
    )
    assert isinstance(strategy, FedAvg)
    assert (strategy.fraction_train, strategy.fraction_evaluate) == (0.5, 0.25)
    assert (strategy.min_train_nodes, strategy.min_evaluate_nodes, strategy.min_available_nodes) == (3, 4, 5)
    assert (strategy.weighted_by_key, strategy.arrayrecord_key, strategy.configrecord_key) == (
        "n",
        "model",
        "cfg",
    )
    assert strategy.fusion_config == FusionConfig()


def test_a_generator_as_calibration_is_refused_because_every_round_reads_it_again(calibration):
    with pytest.raises(TypeError, match="re-iterable"):
        FedFuse(make_net, (batch for batch in [calibration]))


def test_summary_logs_the_fusion_configuration_and_then_fedavgs(strategy, flwr_log):
    strategy.summary()
    text = "\n".join(r.getMessage() for r in flwr_log.records)
    assert "FedFuse settings" in text
    assert "120 labelled inputs" in text
    assert "grouping (kmeans)" in text and "importance (uniform)" in text
    assert "Parent weights: calibration" in text
    assert (
        "Screening: competence >= 0.2 (best 1 class, recall >= 0.5), logit scale <= 10 x the median" in text
    )
    assert "Minimum nodes: train (2)" in text  # FedAvg's part follows


# --- valid replies ---------------------------------------------------------------------------------


def test_valid_replies_are_fused_into_a_model_with_the_clients_keys_shapes_and_dtypes(
    strategy, client_states
):
    replies = [reply(node, state) for node, state in zip([11, 12, 13], client_states, strict=True)]
    arrays, metrics = strategy.aggregate_train(1, replies)

    assert arrays is not None
    sent = ArrayRecord(client_states[0])
    assert list(arrays.keys()) == list(sent.keys())
    for key in sent:
        assert arrays[key].shape == sent[key].shape
        assert arrays[key].dtype == sent[key].dtype
        assert np.isfinite(arrays[key].numpy()).all()
    assert metrics["fusion-clients"] == 3 and metrics["fusion-rejected"] == 0


def test_the_fused_model_classifies_as_well_as_the_clients_did(strategy, client_states, calibration):
    x, y = blobs(300, seed=99)
    arrays, _ = strategy.aggregate_train(1, [reply(n, s) for n, s in enumerate(client_states)])
    client_accuracies = [accuracy(ArrayRecord(state), x, y) for state in client_states]
    assert min(client_accuracies) > 0.9
    assert accuracy(arrays, x, y) > 0.9


def fitted(
    model_fn: Callable[[], nn.Module],
    data: tuple[torch.Tensor, torch.Tensor],
    loss: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor],
    steps: int,
    seed: int,
) -> nn.Module:
    """A client's model, trained full-batch with Adam on its own data."""
    torch.manual_seed(seed)
    model = model_fn()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(steps):
        optimizer.zero_grad()
        loss(model, *data).backward()
        optimizer.step()
    return model


def test_a_binary_classifier_with_one_sigmoid_output_is_screened_and_fused_without_its_labels():
    """Flower's tabular example: one sigmoid score per sample, trained with BCE. The labelled calibration
    set indexes no class of it, so the strategy screens and fuses on the inputs alone."""
    from tests.user_models import IncomeClassifier

    def income_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        generator = torch.Generator().manual_seed(seed)
        x = torch.randn(n, 14, generator=generator)
        return x, (x[:, 0] + x[:, 1] > 0).long()

    def loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return nn.functional.binary_cross_entropy(model(x).squeeze(1), y.float())

    states = [
        fitted(IncomeClassifier, income_data(200, 100 + seed), loss, steps=60, seed=seed).state_dict()
        for seed in range(3)
    ]
    with pytest.warns(UserWarning, match="one output, which no class label indexes"):
        strategy = FedFuse(model_fn=IncomeClassifier, calibration=income_data(150, 7))
    arrays, metrics = strategy.aggregate_train(1, [reply(n, state) for n, state in enumerate(states)])

    assert arrays is not None and metrics["fusion-clients"] == 3
    fused = IncomeClassifier()
    fused.load_state_dict(arrays.to_torch_state_dict())
    x, y = income_data(1000, 99)
    with torch.no_grad():
        assert float(((fused(x).squeeze(1) > 0.5).long() == y).float().mean()) > 0.9


def test_a_regressor_returning_one_value_per_sample_is_screened_and_fused():
    from tests.user_models import Regressor

    def curve(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(n, 8, generator=torch.Generator().manual_seed(seed))
        return x, 2 * x[:, 0] + x[:, 1].square()

    def loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return (model(x) - y).square().mean()

    x_test, y_test = curve(500, 99)
    clients = [fitted(Regressor, curve(200, 100 + seed), loss, steps=150, seed=seed) for seed in range(3)]
    states = [model.state_dict() for model in clients]
    with torch.no_grad():
        errors = [float(loss(model, x_test, y_test)) for model in clients]
    strategy = FedFuse(model_fn=Regressor, calibration=curve(150, 7)[0])
    arrays, metrics = strategy.aggregate_train(1, [reply(n, state) for n, state in enumerate(states)])

    assert arrays is not None and metrics["fusion-clients"] == 3
    fused = Regressor()
    fused.load_state_dict(arrays.to_torch_state_dict())
    with torch.no_grad():
        assert float((fused(x_test) - y_test).square().mean()) < np.mean(errors)


def values(state: dict[str, torch.Tensor]) -> bytes:
    return b"".join(tensor.numpy().tobytes() for tensor in state.values())


def test_by_default_the_result_is_the_engines_fusion_weighted_by_what_the_server_measures(
    strategy, client_states, calibration, monkeypatch
):
    """Claimed example counts do not weight the fusion: the engine measures every parent itself."""
    calls = spy_on_fuse(monkeypatch)
    replies = [
        reply(n, s, {"num-examples": w})
        for n, s, w in zip([1, 2, 3], client_states, [10, 50, 1e9], strict=True)
    ]
    arrays, _ = strategy.aggregate_train(1, replies)

    (call,) = calls
    assert call["weights"] is None
    assert {values(m.state_dict()) for m in call["models"]} == {values(s) for s in client_states}
    expected = fuse(call["models"], calibration, config=FusionConfig(seed=0)).model
    for key, tensor in expected.state_dict().items():
        np.testing.assert_array_equal(arrays[key].numpy(), tensor.numpy())


def test_with_parent_weights_num_examples_each_client_is_weighted_by_its_claim(
    calibration, client_states, monkeypatch
):
    calls = spy_on_fuse(monkeypatch)
    strategy = FedFuse(
        make_net, calibration, fusion_config=FusionConfig(seed=0), parent_weights="num-examples"
    )
    replies = [
        reply(n, s, {"num-examples": w})
        for n, s, w in zip([1, 2, 3], client_states, [10, 50, 40], strict=True)
    ]
    arrays, _ = strategy.aggregate_train(1, replies)
    (call,) = calls
    # In proportion to the claims (scaled so that the largest is 1; none is above the cap)
    parents = {values(m.state_dict()): w for m, w in zip(call["models"], call["weights"], strict=True)}
    expected = {values(s): w / 50 for s, w in zip(client_states, [10.0, 50.0, 40.0], strict=True)}
    assert parents == pytest.approx(expected)


def test_the_metrics_report_clients_fused_and_rejected_fusion_seconds_fit_quality_and_client_metrics(
    strategy, client_states
):
    replies = [reply(n, s, {"num-examples": 100, "train-loss": 0.1 * n}) for n, s in enumerate(client_states)]
    replies.append(reply(9, None))
    _, metrics = strategy.aggregate_train(1, replies)

    assert metrics["fusion-clients"] == 3
    assert metrics["fusion-rejected"] == 1
    assert metrics["fusion-seconds"] > 0
    assert 0 < metrics["fusion-mean-fit-r2"] <= 1
    assert 0 < metrics["fusion-max-norm-ratio"] < 3  # the fused weights stay the clients' size
    assert metrics["train-loss"] == pytest.approx(0.1)  # FedAvg's weighted mean of the clients' own metric
    assert "num-examples" not in metrics


def test_one_valid_client_is_returned_as_it_came(calibration, client_states):
    strategy = FedFuse(make_net, calibration, min_train_nodes=1)
    arrays, metrics = strategy.aggregate_train(1, [reply(5, client_states[0])])
    for key, tensor in client_states[0].items():
        np.testing.assert_array_equal(arrays[key].numpy(), tensor.numpy())
    assert metrics["fusion-clients"] == 1


def test_fusion_depends_on_the_client_models_only_not_on_reply_order_or_node_ids(calibration, client_states):
    replies = [reply(n, s) for n, s in zip([30, 10, 20], client_states, strict=True)]
    first, _ = FedFuse(make_net, calibration).aggregate_train(1, replies)
    # Another run: other node ids (Flower draws them at random), replies arriving in another order.
    other_run = [reply(n, s) for n, s in zip([7, 8, 9], client_states, strict=True)]
    random.Random(1).shuffle(other_run)
    second, _ = FedFuse(make_net, calibration).aggregate_train(1, other_run)
    for key in first:
        assert first[key].data == second[key].data


# --- label counts (opt-in: parent_weights="label-counts") --------------------------------------------


def spy_on_fuse(monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    calls: list[dict] = []

    def spy(models, calibration, config=None, weights=None, levels=None):
        calls.append(
            {
                "parents": len(models),
                "models": list(models),
                "weights": weights,
                "levels": levels,
                "config": config,
            }
        )
        return fuse(models, calibration, config=config, weights=weights, levels=levels)

    monkeypatch.setattr(fedfuse_module, "fuse", spy)
    return calls


@pytest.fixture
def counting(calibration) -> FedFuse:
    return FedFuse(make_net, calibration, fusion_config=FusionConfig(seed=0), parent_weights="label-counts")


def test_label_counts_reported_by_every_client_weight_the_output_layer_per_class(
    counting, client_states, monkeypatch
):
    strategy = counting
    calls = spy_on_fuse(monkeypatch)
    counts = [[50, 30, 20], [0, 10, 90], [33, 33, 34]]
    replies = [
        reply(n, s, {"num-examples": 100, "label-counts": c})
        for n, (s, c) in enumerate(zip(client_states, counts, strict=True))
    ]
    _, metrics = strategy.aggregate_train(1, replies)

    (call,) = calls
    assert isinstance(call["weights"], np.ndarray) and call["weights"].shape == (3, 3)
    rows = {
        values(m.state_dict()): row.tolist() for m, row in zip(call["models"], call["weights"], strict=True)
    }
    expected = {values(s): [n / 100 for n in c] for s, c in zip(client_states, counts, strict=True)}
    assert rows.keys() == expected.keys()  # the counts, scaled so that the largest total is 1
    assert all(rows[key] == pytest.approx(expected[key]) for key in rows)
    assert "label-counts" not in metrics  # served the fusion; a mean of counts would mean nothing


def test_label_counts_from_only_some_clients_fall_back_to_num_examples_with_a_warning(
    counting, client_states, monkeypatch, flwr_log
):
    strategy = counting
    calls = spy_on_fuse(monkeypatch)
    replies = [
        reply(1, client_states[0], {"num-examples": 60, "label-counts": [20, 20, 20]}),
        reply(2, client_states[1], {"num-examples": 40}),
    ]
    _, metrics = strategy.aggregate_train(1, replies)

    assert sorted(calls[0]["weights"]) == pytest.approx([40 / 60, 1.0])
    assert metrics["fusion-clients"] == 2
    assert any(
        "'label-counts' is not reported by every client (missing from nodes 2)" in w
        for w in warnings_of(flwr_log)
    )


# --- faults: the bad client is left out, the rest are fused ------------------------------------------


def _without(state: dict, key: str) -> dict:
    return {k: v for k, v in state.items() if k != key}


def _nan_state(state: dict) -> dict:
    bad = dict(state)
    bad["0.weight"] = state["0.weight"].clone()
    bad["0.weight"][0, 0] = float("nan")
    return bad


def _inf_state(state: dict) -> dict:
    bad = dict(state)
    bad["2.bias"] = state["2.bias"].clone()
    bad["2.bias"][1] = float("inf")
    return bad


def _corrupt_record(state: dict) -> ArrayRecord:
    record = ArrayRecord(state)
    record["0.bias"] = Array(dtype="float32", shape=(HIDDEN,), stype="numpy.ndarray", data=b"not numpy")
    return record


def _without_content(state: dict) -> Mock:
    """A reply neither with an error nor with content: Flower's Message raises on reading it."""
    message = reply(4, state)
    type(message).content = PropertyMock(side_effect=ValueError("Message content is None."))
    return message


BAD_REPLIES: dict[str, tuple[Callable[[dict], Mock], str]] = {
    "error-reply": (lambda s: reply(4, None, error="CUDA out of memory"), "CUDA out of memory"),
    "no-content": (_without_content, "unreadable reply (ValueError: Message content is None.)"),
    "no-arrays": (lambda s: reply(4, None), "exactly one ArrayRecord, found none"),
    "two-arrayrecords": (
        lambda s: reply(4, s, extra_records={"other": ArrayRecord(s)}),
        "exactly one ArrayRecord, found 2",
    ),
    "missing-key": (lambda s: reply(4, _without(s, "2.bias")), "misses 1 array: '2.bias'"),
    "extra-key": (
        lambda s: reply(4, {**s, "head.weight": torch.zeros(2)}),
        "unexpected 1 array: 'head.weight'",
    ),
    "wrong-shape": (
        lambda s: reply(4, {**s, "0.weight": torch.zeros(HIDDEN + 1, FEATURES)}),
        f"'0.weight' has shape ({HIDDEN + 1}, {FEATURES}), expected ({HIDDEN}, {FEATURES})",
    ),
    "wrong-dtype": (
        lambda s: reply(4, {**s, "0.weight": s["0.weight"].half()}),
        "'0.weight' has dtype float16, expected float32",
    ),
    "nan-weights": (lambda s: reply(4, _nan_state(s)), "'0.weight' holds NaN or Inf"),
    "inf-weights": (lambda s: reply(4, _inf_state(s)), "'2.bias' holds NaN or Inf"),
    "undecodable-array": (lambda s: reply(4, _corrupt_record(s)), "'0.bias' cannot be decoded"),
    "missing-num-examples": (lambda s: reply(4, s, {"train-loss": 0.3}), "has no 'num-examples'"),
    "zero-num-examples": (lambda s: reply(4, s, {"num-examples": 0}), "'num-examples' must be a positive"),
    "list-num-examples": (
        lambda s: reply(4, s, {"num-examples": [1, 2]}),
        "'num-examples' must be a positive",
    ),
    "no-metrics": (
        lambda s: reply(4, s, extra_records={"metrics": ConfigRecord({"a": 1})}),
        "exactly one MetricRecord, found none",
    ),
    "negative-label-counts": (
        lambda s: reply(4, s, {"num-examples": 10, "label-counts": [5, -1, 6]}),
        "'label-counts' must be a list of non-negative",
    ),
    "scalar-label-counts": (
        lambda s: reply(4, s, {"num-examples": 10, "label-counts": 10}),
        "'label-counts' must be a list of non-negative",
    ),
}


@pytest.mark.parametrize("fault", list(BAD_REPLIES))
def test_a_bad_client_is_left_out_with_a_warning_naming_its_node_and_reason_and_the_rest_are_fused(
    fault, strategy, client_states, monkeypatch, flwr_log
):
    calls = spy_on_fuse(monkeypatch)
    make_bad, reason = BAD_REPLIES[fault]
    replies = [reply(1, client_states[0]), make_bad(client_states[2]), reply(2, client_states[1])]

    arrays, metrics = strategy.aggregate_train(1, replies)

    assert arrays is not None
    assert calls[0]["parents"] == 2
    assert metrics["fusion-clients"] == 2 and metrics["fusion-rejected"] == 1
    left_out = [w for w in warnings_of(flwr_log) if "node 4 is left out" in w]
    assert len(left_out) == 1 and reason in left_out[0], warnings_of(flwr_log)


def test_fewer_valid_clients_than_min_train_nodes_keep_the_previous_model_with_a_warning(
    calibration, client_states, flwr_log
):
    strategy = FedFuse(make_net, calibration, min_train_nodes=3)
    replies = [reply(1, client_states[0]), reply(2, _nan_state(client_states[1])), reply(3, client_states[2])]

    arrays, metrics = strategy.aggregate_train(1, replies)

    assert arrays is None
    assert metrics["fusion-clients"] == 0 and metrics["fusion-rejected"] == 1
    assert any("fewer than the 3 needed" in w and "keeping the previous" in w for w in warnings_of(flwr_log))


def test_no_replies_at_all_keep_the_previous_model(strategy, flwr_log):
    arrays, metrics = strategy.aggregate_train(1, [])
    assert arrays is None
    assert metrics["fusion-clients"] == 0 and metrics["fusion-rejected"] == 0
    assert any("0 clients left to fuse" in w for w in warnings_of(flwr_log))


def test_an_engine_error_keeps_the_previous_model_with_a_warning_instead_of_raising(
    strategy, client_states, monkeypatch, flwr_log
):
    def rejecting_engine(*args, **kwargs):
        raise ValueError("parent 1: parameter '0.weight' differs in shape")

    monkeypatch.setattr(fedfuse_module, "fuse", rejecting_engine)
    arrays, metrics = strategy.aggregate_train(1, [reply(1, client_states[0]), reply(2, client_states[1])])

    assert arrays is None
    assert metrics["fusion-clients"] == 0
    assert metrics["fusion-failures"] == 1 and metrics["fusion-failed"] == 1
    warnings = warnings_of(flwr_log)
    assert any("fusing 2 clients (nodes 1, 2) failed (ValueError: parent 1" in w for w in warnings)
    assert any("the fusion engine failed" in w and "keeping the previous global model" in w for w in warnings)


def test_a_fusion_past_its_timeout_is_abandoned_and_the_previous_model_kept(
    calibration, client_states, monkeypatch, flwr_log
):
    released, finished = threading.Event(), threading.Event()

    def slow_engine(*args, **kwargs):
        released.wait(3)
        finished.set()

    monkeypatch.setattr(fedfuse_module, "fuse", slow_engine)
    strategy = FedFuse(make_net, calibration, fusion_timeout=0.2)
    started = time.perf_counter()
    try:
        arrays, _ = strategy.aggregate_train(1, [reply(1, client_states[0]), reply(2, client_states[1])])
        assert arrays is None
        assert time.perf_counter() - started < 2
        assert any("TimeoutError" in w and "within 0.2 s" in w for w in warnings_of(flwr_log))
    finally:
        # The abandoned fusion holds the clients' tensors: let it end now, not while the interpreter
        # shuts down, where freeing them from a daemon thread aborts the process.
        released.set()
        assert finished.wait(5)


def test_a_fused_model_that_is_not_finite_is_not_sent_to_the_clients(
    strategy, client_states, monkeypatch, flwr_log
):
    def degenerate_engine(models, calibration, config=None, weights=None, levels=None):
        result = fuse(models, calibration, config=config, weights=weights, levels=levels)
        with torch.no_grad():
            result.model[2].bias.fill_(float("nan"))
        return result

    monkeypatch.setattr(fedfuse_module, "fuse", degenerate_engine)
    arrays, _ = strategy.aggregate_train(1, [reply(1, client_states[0]), reply(2, client_states[1])])
    assert arrays is None
    assert any("the fused array '2.bias' holds NaN or Inf" in w for w in warnings_of(flwr_log))


# --- start(): one-shot and multi-round runs against a fake grid ---------------------------------------


@pytest.fixture
def task_identity() -> Iterator[None]:
    """What a running ServerApp sets (as Flower's compat layer does) so that messages can be built."""
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    yield
    TaskIdentity.task_id = TaskIdentity.run_id = TaskIdentity.node_id = None


class FakeGrid:
    """A Grid whose nodes answer training messages with ``client(node_id, received_state)``."""

    def __init__(self, client: Callable[[int, dict[str, torch.Tensor]], Mock], node_ids=(101, 102, 103)):
        self.grid = Mock(spec=Grid)
        self.grid.get_node_ids.return_value = list(node_ids)
        self.grid.send_and_receive.side_effect = self._send_and_receive
        self.client = client
        self.sent: list[Message] = []

    def _send_and_receive(self, messages, timeout=None):
        messages = list(messages)
        self.sent.extend(messages)
        if messages and messages[0].metadata.message_type != "train":
            return []  # no federated evaluation in these tests
        return [
            self.client(m.metadata.dst_node_id, m.content["arrays"].to_torch_state_dict()) for m in messages
        ]


def training_client(node_id: int, received: dict[str, torch.Tensor]) -> Mock:
    return reply(node_id, trained_state(node_id, start=received))


def test_a_one_shot_run_returns_the_fused_model(task_identity, calibration):
    grid = FakeGrid(training_client)
    strategy = FedFuse(make_net, calibration, fraction_evaluate=0.0)
    torch.manual_seed(0)
    result = strategy.start(grid=grid.grid, initial_arrays=ArrayRecord(make_net().state_dict()), num_rounds=1)

    assert result.train_metrics_clientapp[1]["fusion-clients"] == 3
    x, y = blobs(300, seed=99)
    assert accuracy(result.arrays, x, y) > 0.9


def test_the_calibration_set_never_leaves_the_server(task_identity, calibration):
    grid = FakeGrid(training_client)
    strategy = FedFuse(make_net, calibration, fraction_evaluate=0.0)
    strategy.start(grid=grid.grid, initial_arrays=ArrayRecord(make_net().state_dict()), num_rounds=2)

    calibration_bytes = calibration[0].numpy().tobytes()[:64]
    for message in grid.sent:
        assert set(message.content.keys()) == {"arrays", "config"}  # exactly what FedAvg sends
        assert list(message.content["arrays"].keys()) == list(make_net().state_dict().keys())
        assert all(calibration_bytes not in array.data for array in message.content["arrays"].values())


def test_in_a_multi_round_run_the_next_round_starts_from_the_fused_model(task_identity, calibration):
    received: list[dict[str, torch.Tensor]] = []  # three clients a round, in round order

    def recording_client(node_id, state):
        received.append(state)
        return training_client(node_id, state)

    grid = FakeGrid(recording_client)
    strategy = FedFuse(make_net, calibration, fraction_evaluate=0.0)
    fused_per_round: dict[int, ArrayRecord] = {}
    original = strategy.aggregate_train

    def recording_aggregate(server_round, replies):
        arrays, metrics = original(server_round, replies)
        fused_per_round[server_round] = arrays
        return arrays, metrics

    strategy.aggregate_train = recording_aggregate
    result = strategy.start(grid=grid.grid, initial_arrays=ArrayRecord(make_net().state_dict()), num_rounds=3)

    assert sorted(result.train_metrics_clientapp) == [1, 2, 3]
    for round_ in (2, 3):
        for state in received[3 * (round_ - 1) : 3 * round_]:
            for key, tensor in fused_per_round[round_ - 1].to_torch_state_dict().items():
                torch.testing.assert_close(state[key], tensor, rtol=0, atol=0)


def test_rounds_the_clients_train_further_group_by_index_and_lean_on_the_average_the_last_as_configured(
    task_identity, calibration, monkeypatch
):
    calls = spy_on_fuse(monkeypatch)
    configured = FusionConfig(seed=3, ridge=0.05)
    strategy = FedFuse(make_net, calibration, fusion_config=configured, fraction_evaluate=0.0)
    strategy.start(
        grid=FakeGrid(training_client).grid, initial_arrays=ArrayRecord(make_net().state_dict()), num_rounds=3
    )
    assert [call["config"] for call in calls] == [
        fedfuse_module.continuing(configured),
        fedfuse_module.continuing(configured),
        configured,
    ]
    assert fedfuse_module.continuing(configured).grouping == "index"
    assert fedfuse_module.continuing(configured).ridge == fedfuse_module.CONTINUING_RIDGE


def test_a_fusion_that_would_change_the_clients_architecture_is_refused(calibration):
    with pytest.raises(ValueError, match="width_multiplier must be 1 in a Flower strategy"):
        FedFuse(make_net, calibration, fusion_config=FusionConfig(width_multiplier=2))


def test_a_federation_of_faulty_clients_survives_start_and_its_result_holds_the_initial_model(
    task_identity, calibration, flwr_log
):
    def faulty_client(node_id, state):
        if node_id == 101:
            return reply(node_id, None, error="client crashed")
        return reply(node_id, _nan_state(state))

    initial = ArrayRecord(make_net().state_dict())
    grid = FakeGrid(faulty_client)
    strategy = FedFuse(make_net, calibration, fraction_evaluate=0.0)
    result = strategy.start(grid=grid.grid, initial_arrays=initial, num_rounds=2)

    # no round fused a model: each returned the previous one, so the result holds a usable (initial) model
    assert list(result.arrays.keys()) == list(initial.keys())
    assert all(result.arrays[k].data == initial[k].data for k in initial)
    assert [result.train_metrics_clientapp[r]["fusion-failed"] for r in (1, 2)] == [1, 1]
    for message in grid.sent:  # so round 2 sent the initial model again
        assert all(message.content["arrays"][k].data == initial[k].data for k in initial)
    assert result.train_metrics_clientapp[2]["fusion-rejected"] == 3
    warnings = warnings_of(flwr_log)
    assert sum("node 101 is left out: it replied with an error" in w for w in warnings) == 2
    assert sum("node 102 is left out: array '0.weight' holds NaN or Inf" in w for w in warnings) == 2


def test_replies_are_checked_against_the_global_model_sent_not_against_model_fn(task_identity, calibration):
    """A federation in float64: the model sent out defines the keys and dtypes, and comes back in them."""

    def float64_client(node_id, state):
        return reply(node_id, {k: v.double() for k, v in trained_state(node_id, start=state).items()})

    initial = ArrayRecord({k: v.double() for k, v in make_net().state_dict().items()})
    strategy = FedFuse(make_net, calibration, fraction_evaluate=0.0)
    result = strategy.start(grid=FakeGrid(float64_client).grid, initial_arrays=initial, num_rounds=1)

    assert result.train_metrics_clientapp[1]["fusion-clients"] == 3
    assert {array.dtype for array in result.arrays.values()} == {"float64"}


@pytest.mark.parametrize("variant", ["linear", "gradient"])
def test_a_residual_network_with_batchnorm_is_fused_keeping_keys_and_dtypes(variant: str):
    """Clients training a ResNet with BatchNorm buffers (int64 counters included): the strategy fuses it
    with either variant and returns exactly the keys, shapes and dtypes they sent."""
    from fedfuse.models import build_model

    def resnet(seed: int | None = None) -> nn.Module:
        return build_model("resnet8", in_channels=1, image_size=8, num_classes=3, seed=seed, width=4)

    images = torch.rand(60, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    strategy = FedFuse(
        model_fn=resnet,
        calibration=images,
        fusion_config=FusionConfig(variant=variant, epochs=2),
        min_train_nodes=2,
    )
    states = [resnet(seed).state_dict() for seed in (1, 2)]
    arrays, metrics = strategy.aggregate_train(1, [reply(5, states[0]), reply(6, states[1])])
    assert arrays is not None and metrics["fusion-clients"] == 2
    sent = ArrayRecord(states[0])
    assert list(arrays.keys()) == list(sent.keys())
    assert all(arrays[key].dtype == sent[key].dtype and arrays[key].shape == sent[key].shape for key in sent)
    fused = resnet()
    fused.load_state_dict(arrays.to_torch_state_dict())
    assert fused(images).shape == (60, 3)


# --- failing fast: the model is checked when the strategy is built -------------------------------------


def test_a_model_the_variant_cannot_fuse_is_refused_when_the_strategy_is_built():
    from fedfuse.models import build_model

    def vit() -> nn.Module:
        return build_model("vit", in_channels=1, image_size=8, num_classes=3, dim=16, depth=1)

    images = torch.rand(20, 1, 8, 8)
    with pytest.raises(
        ValueError, match=r"FedFuse cannot fuse the ViT that model_fn builds with 'linear' fusion"
    ):
        FedFuse(model_fn=vit, calibration=images, fusion_config=FusionConfig(variant="linear"))
    assert FedFuse(model_fn=vit, calibration=images).plan  # the default: closed form where it can


@pytest.mark.parametrize(
    ("calibration", "message"),
    [
        (torch.randn(20, FEATURES + 1), "cannot run on the calibration inputs"),
        (
            (torch.randn(20, FEATURES), torch.full((20,), CLASSES)),
            r"labels must be class indices in \[0, 3\)",
        ),
    ],
)
def test_calibration_data_that_does_not_fit_the_model_is_refused_when_the_strategy_is_built(
    calibration, message
):
    with pytest.raises(ValueError, match=message):
        FedFuse(model_fn=make_net, calibration=calibration)


def test_an_untraceable_model_is_refused_up_front_and_fused_with_the_levels_it_is_given(calibration):
    from tests.user_models import DataDependent

    x, y = torch.randn(120, 8), torch.randint(0, 3, (120,))
    with pytest.raises(TypeError, match="cannot be traced"):
        FedFuse(model_fn=DataDependent, calibration=(x, y))
    # Untrained models are no better than chance: screening would leave them out.
    strategy = FedFuse(model_fn=DataDependent, calibration=(x, y), levels=["fc", "head"], screening=None)
    states = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        states.append(DataDependent().state_dict())
    arrays, metrics = strategy.aggregate_train(1, [reply(1, states[0]), reply(2, states[1])])
    assert arrays is not None and metrics["fusion-clients"] == 2 and metrics["fusion-failed"] == 0


def test_a_custom_module_like_the_quickstart_net_is_fused_by_the_default_strategy():
    from tests.user_models import QuickstartNet

    images = torch.randn(40, 3, 32, 32)
    strategy = FedFuse(model_fn=QuickstartNet, calibration=images, min_train_nodes=2)
    states = []
    for seed in (1, 2, 3):
        torch.manual_seed(seed)
        states.append(QuickstartNet().state_dict())
    arrays, metrics = strategy.aggregate_train(1, [reply(k, state) for k, state in enumerate(states)])
    assert arrays is not None and metrics["fusion-clients"] == 3
    assert list(arrays.keys()) == list(states[0].keys())


def test_a_round_that_cannot_fuse_returns_the_global_model_it_sent(
    task_identity, calibration, client_states, flwr_log
):
    strategy = FedFuse(make_net, calibration, min_train_nodes=3)
    sent = ArrayRecord(make_net().state_dict())
    grid = FakeGrid(training_client)
    list(strategy.configure_train(1, sent, ConfigRecord(), grid.grid))
    arrays, metrics = strategy.aggregate_train(1, [reply(1, client_states[0])])
    assert arrays is sent and metrics["fusion-failed"] == 1
    assert sum("keeping the previous global model" in w for w in warnings_of(flwr_log)) == 1


# --- the guard: a round never hands the clients a model clearly worse than the one they had -----------


def biased_engine(models, calibration, config=None, weights=None, levels=None):
    """The engine's fusion with the output bias pushed toward class 0: a well-formed model that fits
    nothing (what a round of collapsed clients, or poison the screening missed, can leave)."""
    result = fuse(models, calibration, config=config, weights=weights, levels=levels)
    with torch.no_grad():
        result.model[2].bias.copy_(torch.tensor([100.0, 0.0, 0.0]))
    return result


def guarded_round(strategy: FedFuse, client_states) -> tuple[ArrayRecord, ArrayRecord | None, MetricRecord]:
    """Round 2 of a run whose global model is client 0's trained model; clients 1 and 2 reply."""
    sent = ArrayRecord(client_states[0])
    list(strategy.configure_train(2, sent, ConfigRecord(), FakeGrid(training_client).grid))
    arrays, metrics = strategy.aggregate_train(2, [reply(1, client_states[1]), reply(2, client_states[2])])
    return sent, arrays, metrics


def test_a_fused_model_clearly_worse_on_the_calibration_set_keeps_the_global_model_with_a_warning(
    task_identity, calibration, client_states, monkeypatch, flwr_log
):
    monkeypatch.setattr(fedfuse_module, "fuse", biased_engine)
    sent, arrays, metrics = guarded_round(FedFuse(make_net, calibration), client_states)

    assert arrays is sent
    assert metrics["fusion-kept-previous"] == 1 and metrics["fusion-clients"] == 2
    assert metrics["fusion-calibration-accuracy"] < 0.5 < metrics["fusion-previous-calibration-accuracy"]
    assert any(
        "the fused model is worse than the previous global model (calibration accuracy" in w
        and "keeping the previous one" in w
        for w in warnings_of(flwr_log)
    )


def test_with_the_guard_off_the_fused_model_is_returned_whatever_it_scores(
    task_identity, calibration, client_states, monkeypatch
):
    monkeypatch.setattr(fedfuse_module, "fuse", biased_engine)
    sent, arrays, metrics = guarded_round(FedFuse(make_net, calibration, guard=False), client_states)

    assert arrays is not None and arrays is not sent
    assert metrics["fusion-kept-previous"] == 0
    assert accuracy(arrays, *calibration) < 0.5


def test_a_fused_model_as_good_as_the_global_one_is_returned_with_both_accuracies_reported(
    task_identity, calibration, client_states
):
    sent, arrays, metrics = guarded_round(FedFuse(make_net, calibration), client_states)

    assert arrays is not sent and metrics["fusion-kept-previous"] == 0
    assert metrics["fusion-calibration-accuracy"] == pytest.approx(accuracy(arrays, *calibration))
    assert metrics["fusion-previous-calibration-accuracy"] == pytest.approx(accuracy(sent, *calibration))


def test_the_guard_must_be_a_bool(calibration):
    with pytest.raises(TypeError, match="guard must be True or False"):
        FedFuse(make_net, calibration, guard="yes")  # type: ignore[arg-type]


class CountingBatches:
    """A re-iterable of calibration batches that counts how often it is read."""

    def __init__(self, batches: list) -> None:
        self.batches, self.reads = batches, 0

    def __iter__(self):
        self.reads += 1
        return iter(self.batches)


def test_a_round_screens_fuses_and_guards_on_the_calibration_batches_read_when_the_strategy_was_built(
    task_identity, calibration, client_states
):
    x, y = calibration
    batches = CountingBatches([(x[i : i + 40], y[i : i + 40]) for i in range(0, len(x), 40)])
    strategy = FedFuse(make_net, batches)
    reads = batches.reads
    sent, arrays, metrics = guarded_round(strategy, client_states)
    assert arrays is not None and metrics["fusion-clients"] == 2
    assert "fusion-previous-calibration-accuracy" in metrics
    assert batches.reads == reads  # not once per screening, fusion and comparison
