"""FedFuse: FedAvg with neuron-interpolation fusion in place of weight averaging.

Paper: Luenam, Spanopoulos et al., 2025 (model fusion by neuron interpolation).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import replace
from logging import INFO, WARNING
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Result
from torch import nn

from fedfuse.fusion import FusionConfig, FusionResult, LevelPlan, LevelSpec, check_fusable, fuse
from fedfuse.strategy.replies import (
    ArraySpec,
    InvalidReply,
    TrainReply,
    array_specs,
    check_train_reply,
)

#: How the fusion weights the clients: measured by the server, or as the clients claim.
PARENT_WEIGHTS = ("calibration", "num-examples", "label-counts")

#: The server-side calibration data: inputs, an (inputs, labels) pair, or a re-iterable of batches.
Calibration = torch.Tensor | tuple[torch.Tensor, torch.Tensor] | Iterable


class FedFuse(FedAvg):
    """Federated learning with neuron-interpolation fusion instead of weight averaging.

    A drop-in replacement for `flwr.serverapp.strategy.FedAvg`: sampling, configuration, federated
    evaluation and metric aggregation are FedAvg's; only ``aggregate_train`` differs. It turns every
    valid client's ArrayRecord into a model built by ``model_fn``, fuses the models on the server's
    calibration set (each client weighted per class by what the server measures of it there; claimed
    example or label counts only when asked, ``parent_weights``) and returns an ArrayRecord with the
    keys, shapes and dtypes of the global model the clients trained from.
    Works one-shot (``num_rounds=1``) and over many rounds (fusion every round).

    The calibration set stays on the server: it is never put in a message. Clients send what FedAvg
    clients send (an ArrayRecord and a MetricRecord with ``num-examples``); per-class example counts
    under ``label_counts_key`` are an opt-in extra.

    The model is checked when the strategy is built: ``model_fn()`` is traced on one calibration batch
    and its levels checked against ``fusion_config`` (`fedfuse.check_fusable`), so a model the engine
    cannot fuse raises then, not in every round.

    A bad reply (an error, no or several ArrayRecords, missing or extra keys, wrong shape or dtype,
    NaN/Inf, a missing or non-positive ``num-examples``, malformed label counts) leaves that client out
    with a warning naming its node id and the reason. With fewer valid clients than
    ``min_train_nodes``, or when fusion fails or times out, the round keeps the previous global model
    with one warning saying why: ``aggregate_train`` returns that model's arrays again, so ``start()``'s
    ``Result.arrays`` always holds a usable model. Nothing raises out of ``start()``.

    Parameters
    ----------
    model_fn : Callable[[], nn.Module]
        Builds a model of the federation's architecture: any ``nn.Module`` whose forward takes one
        tensor and returns logits (its levels are found by tracing, `fedfuse.describe_levels`). Each
        client's arrays are loaded into a fresh one; its state_dict keys must be the ArrayRecord's keys.
    calibration : Tensor | tuple[Tensor, Tensor] | Iterable
        Server-side calibration data: inputs ``[N, ...]``, an ``(inputs, labels)`` pair (labels are the
        attribution targets of importance scores), or a re-iterable of such batches (a DataLoader or a
        list; not a generator, since every round reads it again).
    fusion_config : FusionConfig, optional (default: None)
        How to fuse; ``FusionConfig()`` when None.
    levels : Sequence[LevelSpec | str], optional (default: None)
        The model's levels, declared (`fedfuse.fusion.declared`), for a model that cannot be traced;
        passed to every fusion. None: the model's own ``fusion_levels()``, else tracing.
    parent_weights : str (default: "calibration")
        How the fusion weights the clients. ``"calibration"``: per class, by what the server measures of
        each client's model on its own calibration set (`fedfuse.fusion.weights`): nothing the clients
        claim counts. ``"num-examples"``: by the claimed ``weighted_by_key``. ``"label-counts"``: per class
        by the claimed label counts under ``label_counts_key``, when every client sends them alike, else by
        ``weighted_by_key``.
    label_counts_key : str (default: "label-counts")
        The opt-in MetricRecord key under which clients may report per-class example counts (a list
        of length num_classes), read with ``parent_weights="label-counts"``.
    fusion_timeout : float or None (default: 3600)
        Seconds one fusion may take. A fusion still running then is abandoned (it finishes in a
        background thread and its result is dropped) and the round keeps the previous global model.
        None waits without limit.
    fraction_train, fraction_evaluate, min_train_nodes, min_evaluate_nodes, min_available_nodes,
    weighted_by_key, arrayrecord_key, configrecord_key, train_metrics_aggr_fn,
    evaluate_metrics_aggr_fn
        As in `FedAvg`. ``weighted_by_key`` ("num-examples") weights the clients' metrics (and the
        parents, with ``parent_weights="num-examples"``); ``min_train_nodes`` is also the fewest valid
        replies a round fuses.
    """

    # pylint: disable=too-many-arguments,too-many-locals
    def __init__(
        self,
        model_fn: Callable[[], nn.Module],
        calibration: Calibration,
        fusion_config: FusionConfig | None = None,
        *,
        levels: Sequence[LevelSpec | str] | None = None,
        parent_weights: str = "calibration",
        label_counts_key: str = "label-counts",
        fusion_timeout: float | None = 3600.0,
        fraction_train: float = 1.0,
        fraction_evaluate: float = 1.0,
        min_train_nodes: int = 2,
        min_evaluate_nodes: int = 2,
        min_available_nodes: int = 2,
        weighted_by_key: str = "num-examples",
        arrayrecord_key: str = "arrays",
        configrecord_key: str = "config",
        train_metrics_aggr_fn: Callable[[list[RecordDict], str], MetricRecord] | None = None,
        evaluate_metrics_aggr_fn: Callable[[list[RecordDict], str], MetricRecord] | None = None,
    ) -> None:
        if not callable(model_fn):
            raise TypeError(f"model_fn must be a callable that builds a model, got {type(model_fn).__name__}")
        if isinstance(calibration, Iterator):
            raise TypeError(
                "calibration must be re-iterable (a tensor, an (inputs, labels) pair, a list of batches or "
                "a DataLoader), not an iterator or generator: fusion reads it again every round"
            )
        if fusion_config is not None and not isinstance(fusion_config, FusionConfig):
            raise TypeError(f"fusion_config must be a FusionConfig, got {type(fusion_config).__name__}")
        if parent_weights not in PARENT_WEIGHTS:
            raise ValueError(
                f"parent_weights must be one of {', '.join(map(repr, PARENT_WEIGHTS))}, "
                f"got {parent_weights!r}"
            )
        if fusion_timeout is not None and not fusion_timeout > 0:
            raise ValueError(
                f"fusion_timeout must be a positive number of seconds or None, got {fusion_timeout}"
            )
        super().__init__(
            fraction_train=fraction_train,
            fraction_evaluate=fraction_evaluate,
            min_train_nodes=min_train_nodes,
            min_evaluate_nodes=min_evaluate_nodes,
            min_available_nodes=min_available_nodes,
            weighted_by_key=weighted_by_key,
            arrayrecord_key=arrayrecord_key,
            configrecord_key=configrecord_key,
            train_metrics_aggr_fn=train_metrics_aggr_fn,
            evaluate_metrics_aggr_fn=evaluate_metrics_aggr_fn,
        )
        self.model_fn = model_fn
        self.calibration = calibration
        self.fusion_config = fusion_config if fusion_config is not None else FusionConfig()
        self.levels = None if levels is None else list(levels)
        self.parent_weights = parent_weights
        self.label_counts_key = label_counts_key
        self.fusion_timeout = fusion_timeout
        self.plan = _checked_plan(model_fn, calibration, self.fusion_config, self.levels)
        # The global model sent out by the last configure_train: replies must match its keys, shapes
        # and dtypes, the fused model is returned in them, and a round that cannot fuse returns it.
        self._sent: dict[str, ArraySpec] | None = None
        self._global: ArrayRecord | None = None
        self._rounds: int | None = None  # set while start() runs

    def summary(self) -> None:
        """Log summary configuration of the strategy."""
        config = self.fusion_config
        log(INFO, "\t├──> FedFuse settings:")
        log(INFO, "\t│\t├── Model: %s", getattr(self.model_fn, "__qualname__", repr(self.model_fn)))
        log(
            INFO,
            "\t│\t├── Levels: %d (%s), %d fitted in closed form",
            len(self.plan.levels),
            "traced" if self.plan.traced else "declared",
            sum(level.closed_form for level in self.plan.levels),
        )
        log(INFO, "\t│\t├── Calibration (server-side only): %s", _describe(self.calibration))
        log(
            INFO,
            "\t│\t├── Fusion: variant (%s) | grouping (%s) | importance (%s) | seed (%d)",
            config.variant,
            config.grouping,
            config.importance,
            config.seed,
        )
        log(
            INFO,
            "\t│\t├── Fit: ridge (%g) | batch size (%d) | k-means: restarts (%d), iterations (%d)",
            config.ridge,
            config.batch_size,
            config.kmeans_n_init,
            config.kmeans_max_iter,
        )
        log(
            INFO,
            "\t│\t├── Parent weights: %s%s",
            self.parent_weights,
            f" (key '{self.label_counts_key}')" if self.parent_weights == "label-counts" else "",
        )
        log(
            INFO,
            "\t│\t└── Fusion timeout: %s",
            "none" if self.fusion_timeout is None else f"{self.fusion_timeout:g} s",
        )
        super().summary()

    def start(self, grid: Grid, initial_arrays: ArrayRecord, num_rounds: int = 3, **kwargs: Any) -> Result:
        """Run the rounds as `FedAvg.start` does, knowing how many there are: the fused model of every
        round but the last is one the clients train further, so it is kept no sharper than theirs."""
        self._rounds = num_rounds
        try:
            return super().start(grid, initial_arrays, num_rounds, **kwargs)
        finally:
            self._rounds = None

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Configure the next round of training, as FedAvg does; remember the model sent out."""
        self._sent = array_specs(arrays)
        self._global = arrays
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self,
        server_round: int,
        replies: Iterable[Message],
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Fuse the valid replies' models; leave out bad replies; return the previous model on failure."""
        replies = list(replies)
        reference = self._sent if self._sent is not None else self._model_fn_specs()
        valid: list[TrainReply] = []
        for message in replies:
            try:
                valid.append(
                    check_train_reply(
                        message,
                        reference,
                        weighted_by_key=self.weighted_by_key,
                        label_counts_key=self.label_counts_key,
                    )
                )
            except InvalidReply as error:
                log(
                    WARNING,
                    "aggregate_train: node %s is left out: %s",
                    message.metadata.src_node_id,
                    error.reason,
                )
            except (
                Exception
            ) as error:  # e.g. neither content nor error: Flower's Message raises on reading it
                log(
                    WARNING,
                    "aggregate_train: node %s is left out: unreadable reply (%s: %s)",
                    message.metadata.src_node_id,
                    type(error).__name__,
                    error,
                )
        # No ordering here: the engine orders the parents by what they compute on the calibration set, so
        # neither the replies' arrival order nor their node ids (new every run) change the fused model.
        rejected = len(replies) - len(valid)
        log(INFO, "aggregate_train: Received %s valid results and %s rejected", len(valid), rejected)

        metrics = self._client_metrics(valid)
        metrics["fusion-rejected"] = rejected
        metrics["fusion-clients"] = 0
        metrics["fusion-failed"] = 1
        needed = max(1, self.min_train_nodes)
        if len(valid) < needed:
            log(
                WARNING,
                "aggregate_train: %d valid replies, fewer than the %d needed (min_train_nodes); "
                "keeping the previous global model",
                len(valid),
                needed,
            )
            return self._global, metrics

        started = time.perf_counter()
        try:
            result = self._fuse(valid, server_round)
            arrays = _to_arrayrecord(result.model, reference)
        except Exception as error:  # pylint: disable=broad-except
            log(
                WARNING,
                "aggregate_train: fusing %d clients failed (%s: %s); keeping the previous global model",
                len(valid),
                type(error).__name__,
                error,
            )
            metrics["fusion-seconds"] = time.perf_counter() - started
            return self._global, metrics
        metrics["fusion-clients"] = len(valid)
        metrics["fusion-failed"] = 0
        metrics["fusion-seconds"] = time.perf_counter() - started
        metrics["fusion-mean-fit-r2"] = result.report.mean_fit_r2
        metrics["fusion-max-norm-ratio"] = max(
            (
                level.weight_norm / level.parent_weight_norm
                for level in result.report.levels
                if level.weight_norm is not None and level.parent_weight_norm
            ),
            default=1.0,
        )
        metrics["fusion-ridge"] = result.report.config["ridge"]
        log(
            INFO,
            "aggregate_train: fused %d clients in %.2f s, mean fit R2 %.4f",
            len(valid),
            metrics["fusion-seconds"],
            result.report.mean_fit_r2,
        )
        return arrays, metrics

    def _model_fn_specs(self) -> dict[str, ArraySpec]:
        """The reference when ``aggregate_train`` runs without ``configure_train`` (a custom loop)."""
        return array_specs(ArrayRecord(self.model_fn().state_dict()))

    def _client_metrics(self, valid: list[TrainReply]) -> MetricRecord:
        """The clients' own training metrics, aggregated as FedAvg does; empty if they do not aggregate."""
        if not valid:
            return MetricRecord()
        try:
            metrics = self.train_metrics_aggr_fn([reply.content for reply in valid], self.weighted_by_key)
        except Exception as error:  # pylint: disable=broad-except
            log(
                WARNING,
                "aggregate_train: the clients' MetricRecords could not be aggregated (%s: %s); "
                "reporting fusion metrics only",
                type(error).__name__,
                error,
            )
            return MetricRecord()
        # A weighted mean of label counts means nothing; the counts served the fusion.
        metrics.pop(self.label_counts_key, None)
        return metrics

    def _fuse(self, valid: list[TrainReply], server_round: int) -> FusionResult:
        """Build one model per client and fuse them, within ``fusion_timeout``. In a `start` run, a round
        before the last fuses with ``sharpness_limit="parents"`` (its clients train from the result)."""
        parents = []
        for reply in valid:
            model = self.model_fn()
            model.load_state_dict({key: torch.from_numpy(array) for key, array in reply.arrays.items()})
            parents.append(model)
        weights = self._weights(valid)
        config = self.fusion_config
        if self._rounds is not None and server_round < self._rounds:
            config = replace(config, sharpness_limit="parents")

        def fusion() -> FusionResult:
            return fuse(parents, self.calibration, config=config, weights=weights, levels=self.levels)

        if self.fusion_timeout is None:
            return fusion()
        return _call_with_timeout(fusion, self.fusion_timeout)

    def _weights(self, valid: list[TrainReply]) -> list[float] | np.ndarray | None:
        """None (the engine measures the parents on the calibration set), or the claimed counts: per-class
        label counts ``[K, C]`` when every client sent them alike, else ``num-examples``."""
        if self.parent_weights == "calibration":
            return None
        counts = [reply.label_counts for reply in valid]
        if self.parent_weights == "num-examples":
            return [reply.num_examples for reply in valid]
        if all(c is None for c in counts):
            return [reply.num_examples for reply in valid]
        if any(c is None for c in counts) or len({len(c) for c in counts}) != 1:
            reported = {
                reply.node_id: None if c is None else len(c) for reply, c in zip(valid, counts, strict=True)
            }
            log(
                WARNING,
                "aggregate_train: '%s' is not reported alike by every client (node: number of classes, "
                "%s); weighting clients by '%s' instead",
                self.label_counts_key,
                reported,
                self.weighted_by_key,
            )
            return [reply.num_examples for reply in valid]
        return np.stack(counts)


def _checked_plan(
    model_fn: Callable[[], nn.Module],
    calibration: Calibration,
    config: FusionConfig,
    levels: list[LevelSpec | str] | None,
) -> LevelPlan:
    """The levels of ``model_fn()``, checked against the config and the calibration set once, up front.

    Raises:
        TypeError, ValueError: ``model_fn`` does not build a model the engine can fuse with ``config`` on
            ``calibration``, with the engine's reason.
    """
    model = model_fn()
    if not isinstance(model, nn.Module):
        raise TypeError(f"model_fn must build an nn.Module, it built a {type(model).__name__}")
    try:
        return check_fusable(model, calibration, config, levels)
    except (TypeError, ValueError) as error:
        raise type(error)(
            f"FedFuse cannot fuse the {type(model).__name__} that model_fn builds with {config.variant!r} "
            f"fusion: {error}"
        ) from error


def _call_with_timeout(function: Callable[[], FusionResult], timeout: float) -> FusionResult:
    """Run ``function`` in a daemon thread and wait at most ``timeout`` seconds for it.

    Python cannot stop a thread; an overdue fusion is abandoned to finish in the background (a daemon
    thread, so it never holds up the interpreter's exit) and its result is dropped.
    """
    outcome: dict[str, object] = {}

    def target() -> None:
        try:
            outcome["result"] = function()
        except BaseException as error:  # handed to the caller's thread, which decides
            outcome["error"] = error

    thread = threading.Thread(target=target, name="fedfuse-fusion", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise TimeoutError(f"fusion did not finish within {timeout:g} s (fusion_timeout); it was abandoned")
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    return outcome["result"]  # type: ignore[return-value]


def _to_arrayrecord(model: nn.Module, reference: dict[str, ArraySpec]) -> ArrayRecord:
    """The fused model in exactly the reference's keys, order and dtypes (cast back if needed).

    The fused model has ``model_fn``'s dtypes, which may differ from what the clients sent; a fused
    array that is not finite (a degenerate fit) is refused rather than sent to every client.
    """
    state = model.state_dict()
    arrays = {}
    for key, spec in reference.items():
        array = state[key].detach().cpu().numpy()
        if np.issubdtype(array.dtype, np.inexact) and not np.isfinite(array).all():
            raise ValueError(f"the fused array '{key}' holds NaN or Inf")
        # Not np.ascontiguousarray: it turns 0-d arrays (BatchNorm's num_batches_tracked) into shape (1,).
        arrays[key] = Array(np.array(array, dtype=spec.dtype, order="C"))
    return ArrayRecord(arrays)


def _describe(calibration: Calibration) -> str:
    """A one-line description of the calibration data for ``summary()``: its size, never its content."""
    if isinstance(calibration, torch.Tensor):
        return f"{len(calibration)} inputs of shape {list(calibration.shape[1:])}"
    if isinstance(calibration, tuple) and len(calibration) == 2 and isinstance(calibration[0], torch.Tensor):
        return f"{len(calibration[0])} labelled inputs of shape {list(calibration[0].shape[1:])}"
    return f"batches from a {type(calibration).__name__}"
