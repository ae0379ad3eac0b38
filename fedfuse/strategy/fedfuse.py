"""FedFuse: FedAvg with neuron-interpolation fusion in place of weight averaging.

Paper: Luenam, Spanopoulos et al., 2025 (model fusion by neuron interpolation).
"""

from __future__ import annotations

import threading
import time
import traceback
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import replace
from logging import DEBUG, INFO, WARNING
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Result
from torch import nn

from fedfuse.fusion import FusionConfig, FusionResult, LevelPlan, LevelSpec, check_fusable, fuse
from fedfuse.fusion.calibration import CalibrationSet
from fedfuse.fusion.fuse import labelled_as_classes
from fedfuse.strategy.claims import cap_claims
from fedfuse.strategy.guard import compare
from fedfuse.strategy.neuron_order import check_orders
from fedfuse.strategy.replies import (
    ArraySpec,
    InvalidReply,
    TrainReply,
    array_specs,
    check_train_reply,
    duplicates,
    node_of,
)
from fedfuse.strategy.screening import Screening, ScreeningRule, measure, screen

#: How the fusion weights the clients: measured by the server, or as the clients claim.
PARENT_WEIGHTS = ("calibration", "num-examples", "label-counts")

#: How hard a round whose model the clients train further pulls each fit toward the clients' average
#: (`continuing`), relative to the mean energy of the level's inputs (`FusionConfig.ridge`). Picked
#: between 1 and 10 on the quickstart app's five-round runs (docs/benchmarks.md).
CONTINUING_RIDGE = 10.0

#: A round fused by index checks that its clients share one order of their hidden neurons when it has at
#: least this many (with two, neither can be told from the other), on this many calibration samples.
ORDER_CHECK_CLIENTS, ORDER_CHECK_SAMPLES = 3, 256

#: Why a reply that answers no instruction of the round, or repeats a node's reply, is left out: each node
#: sampled for the round counts once, whatever arrives.
UNSOLICITED = "its reply answers no training instruction of this round"
REPEATED = "the node replied more than once this round, and its first valid reply is the one fused"

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
    with a warning naming its node id and the reason; so does a model the screening finds useless or out
    of line on the calibration set. A fusion that fails is retried without the client behind it, which
    is named. With fewer clients left than ``min_train_nodes``, or when the engine fails on every subset
    tried or times out, the round keeps the previous global model with one warning saying why:
    ``aggregate_train`` returns that model's arrays again, so ``start()``'s ``Result.arrays`` always
    holds a usable model. Nothing raises out of ``start()``. So does a fused model that is clearly worse
    on the calibration set than the model the clients trained from (``guard``).

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
    screening : ScreeningRule or None (default: ScreeningRule())
        Every valid client's model is tested on the calibration set before fusing, and one that is useless
        or out of line with the rest is left out, named with its figures (`fedfuse.strategy.screening`).
        None fuses every valid reply (a failed fusion is still retried without its culprit).
    claim_cap : float (default: 4.0)
        With claimed weights, a client's total claim counts for at most this many times the round's
        median claim (`fedfuse.strategy.claims`).
    label_counts_key : str (default: "label-counts")
        The opt-in MetricRecord key under which clients may report per-class example counts (a list
        of length num_classes), read with ``parent_weights="label-counts"``.
    guard : bool (default: True)
        Keep the previous global model when the fused one classifies the labelled calibration set
        significantly worse (McNemar's paired test at two standard deviations,
        `fedfuse.strategy.guard`), with a warning giving both accuracies: a round whose clients
        collapsed, or whose poison the screening missed, does not wreck the model the next round trains
        from. Needs labelled calibration data (without labels nothing is compared).
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
        screening: ScreeningRule | None = ScreeningRule(),  # noqa: B008  (frozen, so safe to share)
        claim_cap: float = 4.0,
        guard: bool = True,
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
        if screening is not None and not isinstance(screening, ScreeningRule):
            raise TypeError(f"screening must be a ScreeningRule or None, got {type(screening).__name__}")
        if not isinstance(guard, bool):
            raise TypeError(f"guard must be True or False, got {guard!r}")
        if not claim_cap >= 1 or not np.isfinite(claim_cap):
            raise ValueError(f"claim_cap must be a finite number of at least 1, got {claim_cap}")
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
        self.screening = screening
        self.claim_cap = claim_cap
        self.guard = guard
        self.fusion_timeout = fusion_timeout
        if self.fusion_config.width_multiplier != 1:
            raise ValueError(
                "fusion_config.width_multiplier must be 1 in a Flower strategy: the clients train the "
                f"global model's architecture, got {self.fusion_config.width_multiplier!r}"
            )
        self.plan = _checked_plan(model_fn, calibration, self.fusion_config, self.levels)
        # Read once (a DataLoader is read when the set is built): every round's screening, fusions and
        # guard share these batches.
        # Labels that index no class (a model with one output) are set aside, with a warning: screening,
        # fusion and guard then go unlabelled.
        self._calibration_set = labelled_as_classes(
            CalibrationSet(calibration, self.fusion_config.batch_size), self.plan
        )
        # The global model sent out by the last configure_train: replies must match its keys, shapes
        # and dtypes, the fused model is returned in them, and a round that cannot fuse returns it.
        self._sent: dict[str, ArraySpec] | None = None
        self._global: ArrayRecord | None = None
        # The instructions of the last configure_train (the grid gives them their ids as it sends them):
        # an error reply Flower generates in a node's place comes from the SuperLink, and only the
        # instruction it answers says which node it is about.
        self._instructions: list[Message] = []
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
        rule = self.screening
        log(
            INFO,
            "\t│\t├── Screening: %s | claim cap: %g x the median claim",
            "off"
            if rule is None
            else f"competence >= {rule.min_competence:g} (best {rule.competent_classes} "
            f"class{'es' if rule.competent_classes > 1 else ''}, recall >= {rule.min_recall:g}), "
            f"logit scale <= {rule.max_scale_ratio:g} x the median",
            self.claim_cap,
        )
        log(INFO, "\t│\t├── Guard: %s", "keep the previous model if worse" if self.guard else "off")
        log(
            INFO,
            "\t│\t└── Fusion timeout: %s",
            "none" if self.fusion_timeout is None else f"{self.fusion_timeout:g} s",
        )
        super().summary()

    def start(self, grid: Grid, initial_arrays: ArrayRecord, num_rounds: int = 3, **kwargs: Any) -> Result:
        """Run the rounds as `FedAvg.start` does, knowing how many there are: the fused model of every
        round but the last is one the clients train further, fused as `continuing` says."""
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
        self._instructions = list(super().configure_train(server_round, arrays, config, grid))
        return self._instructions

    def aggregate_train(
        self,
        server_round: int,
        replies: Iterable[Message],
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Check the replies, screen their models on the calibration set, fuse the rest.

        A bad reply or a screened-out model leaves that client out, named; a fusion that fails is retried
        without the client behind it (`_fuse_robustly`). When nothing can be fused, the previous global
        model is returned, so that ``Result.arrays`` always holds a usable model.
        """
        replies = list(replies)
        valid = self._valid_replies(replies)
        rejected = len(replies) - len(valid)
        log(INFO, "aggregate_train: Received %s valid results and %s rejected", len(valid), rejected)

        valid, repeated = _distinct(valid)
        metrics = self._client_metrics(valid)
        metrics["fusion-duplicate-nodes"] = repeated
        metrics.update({"fusion-rejected": rejected, "fusion-screened-out": 0, "fusion-failures": 0})
        metrics.update({"fusion-clients": 0, "fusion-failed": 1, "fusion-kept-previous": 0})
        parents = [self._model(reply) for reply in valid]
        if self.screening is not None and parents:
            screening = self._screen(valid, parents)
            left_out = set(screening.left_out)
            metrics["fusion-screened-out"] = len(left_out)
            metrics["fusion-screened-out-nodes"] = [valid[k].node_id for k in sorted(left_out)]
            valid = [reply for k, reply in enumerate(valid) if k not in left_out]
            parents = [model for k, model in enumerate(parents) if k not in left_out]
        metrics.update({"fusion-out-of-order": 0, "fusion-out-of-order-nodes": []})
        if self._continuing(server_round) and len(parents) >= ORDER_CHECK_CLIENTS:
            valid, parents = self._in_shared_order(valid, parents, metrics)
        if len(valid) < self._needed:
            log(
                WARNING,
                "aggregate_train: %d clients left to fuse, fewer than the %d needed (min_train_nodes); "
                "keeping the previous global model",
                len(valid),
                self._needed,
            )
            return self._global, metrics

        started = time.perf_counter()
        outcome = self._fuse_robustly(valid, parents, server_round, metrics)
        metrics["fusion-seconds"] = time.perf_counter() - started
        if outcome is None:
            return self._global, metrics
        arrays, result, fused = outcome
        metrics["fusion-clients"] = len(fused)
        metrics["fusion-failed"] = 0
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
        if self._worse_than_before(result.model, metrics):
            return self._global, metrics
        log(
            INFO,
            "aggregate_train: fused %d clients in %.2f s, mean fit R2 %.4f",
            len(fused),
            metrics["fusion-seconds"],
            result.report.mean_fit_r2,
        )
        return arrays, metrics

    def _continuing(self, server_round: int) -> bool:
        """Whether this round's fused model is one the clients will train further (`continuing`)."""
        return self._rounds is not None and server_round < self._rounds

    def _in_shared_order(
        self, valid: list[TrainReply], parents: list[nn.Module], metrics: MetricRecord
    ) -> tuple[list[TrainReply], list[nn.Module]]:
        """The clients whose hidden neurons are in the order most clients share (a round fused by index
        needs it: `fedfuse.strategy.neuron_order`); each other one is named and left out."""
        parameter = next(parents[0].parameters())
        inputs = self._calibration_set.example(parameter.device, parameter.dtype, size=ORDER_CHECK_SAMPLES)
        orders = check_orders(parents, self.plan, inputs)
        if not orders.shared:
            log(
                WARNING,
                "aggregate_train: half the clients or more do not share one order of their hidden neurons "
                "(did they train from the model they were sent?); fusing them by index all the same",
            )
            return valid, parents
        out = orders.out_of_order
        nodes = [reply.node_id for reply, space in zip(valid, out, strict=True) if space is not None]
        for reply, space in zip(valid, out, strict=True):
            if space is not None:
                log(WARNING, "aggregate_train: node %s is left out: %s", reply.node_id, space.describe())
        metrics["fusion-out-of-order"] = len(nodes)
        metrics["fusion-out-of-order-nodes"] = nodes
        kept = [k for k, space in enumerate(out) if space is None]
        return [valid[k] for k in kept], [parents[k] for k in kept]

    def _worse_than_before(self, fused: nn.Module, metrics: MetricRecord) -> bool:
        """Whether the round must keep the previous global model because ``fused`` is significantly worse
        on the labelled calibration set (`fedfuse.strategy.guard`); the comparison goes in ``metrics``."""
        if not self.guard or self._global is None or not self._calibration_set.has_labels:
            return False
        previous = self.model_fn()
        previous.load_state_dict(self._global.to_torch_state_dict())
        comparison = compare(previous, fused, self._calibration_set)
        metrics["fusion-calibration-accuracy"] = comparison.new_accuracy
        metrics["fusion-previous-calibration-accuracy"] = comparison.previous_accuracy
        if not comparison.worse:
            return False
        metrics["fusion-kept-previous"] = 1
        log(
            WARNING,
            "aggregate_train: the fused model is worse than the previous global model (%s); keeping the "
            "previous one",
            comparison.describe(),
        )
        return True

    @property
    def _needed(self) -> int:
        """The fewest clients a round fuses."""
        return max(1, self.min_train_nodes)

    def _valid_replies(self, replies: list[Message]) -> list[TrainReply]:
        """The replies that pass `check_train_reply`; each other one is named in a warning and left out."""
        reference = self._reference
        recipients = {
            m.metadata.message_id: m.metadata.dst_node_id for m in self._instructions if m.metadata.message_id
        }
        valid: list[TrainReply] = []
        for message in replies:
            try:
                node = node_of(message, recipients)
                unsolicited = bool(recipients) and message.metadata.reply_to_message_id not in recipients
            except Exception:  # pylint: disable=broad-except  # metadata Flower could not decode
                node, unsolicited = -1, False
            if unsolicited:
                log(WARNING, "aggregate_train: node %s is left out: %s", node, UNSOLICITED)
                continue
            if node != -1 and any(reply.node_id == node for reply in valid):
                log(WARNING, "aggregate_train: a reply of node %s is left out: %s", node, REPEATED)
                continue
            try:
                valid.append(
                    check_train_reply(
                        message,
                        reference,
                        node_id=node,
                        weighted_by_key=self.weighted_by_key,
                        label_counts_key=self.label_counts_key,
                        num_classes=self.plan.output_width,
                    )
                )
            except InvalidReply as error:
                log(WARNING, "aggregate_train: node %s is left out: %s", node, error.reason)
            except Exception as error:  # pylint: disable=broad-except  # e.g. neither content nor error
                log(
                    WARNING,
                    "aggregate_train: node %s is left out: unreadable reply (%s: %s)",
                    node,
                    type(error).__name__,
                    error,
                )
        # No ordering here: the engine orders the parents by what they compute on the calibration set, so
        # neither the replies' arrival order nor their node ids (new every run) change the fused model.
        return valid

    def _model(self, reply: TrainReply) -> nn.Module:
        model = self.model_fn()
        model.load_state_dict({key: torch.from_numpy(array) for key, array in reply.arrays.items()})
        return model

    def _screen(self, valid: list[TrainReply], parents: list[nn.Module]) -> Screening:
        """Measure every client's model on the calibration set and apply the screening rule; name each
        client left out, with its figures."""
        rule = self.screening if self.screening is not None else ScreeningRule()
        figures = measure(
            parents, [reply.node_id for reply in valid], self._calibration_set, self.plan.output_width, rule
        )
        screening = screen(figures, rule)
        for k in screening.left_out:
            log(
                WARNING,
                "aggregate_train: node %s is screened out: %s",
                valid[k].node_id,
                screening.reasons[k],
            )
        return screening

    def _fuse_robustly(
        self,
        valid: list[TrainReply],
        parents: list[nn.Module],
        server_round: int,
        metrics: MetricRecord,
    ) -> tuple[ArrayRecord, FusionResult, list[TrainReply]] | None:
        """Fuse; if that fails, find the client behind the failure, name it and fuse without it.

        The retries, each only while at least ``min_train_nodes`` clients remain: first without every
        client the screening rule flags among these (it flags none when they were screened already);
        then without one client at a time, the most suspect first (`Screening.suspicion_order`). The
        first fusion that succeeds names the clients it left out as the cause. When every retry fails
        too, the engine itself failed and None is returned (the caller keeps the previous model). A
        timeout is not retried: it says the fusion is too slow, not which client is bad.
        """
        attempts: list[list[int]] = [list(range(len(valid)))]
        tried = 0
        while tried < len(attempts):
            kept = attempts[tried]
            tried += 1
            try:
                result = self._fuse([valid[k] for k in kept], [parents[k] for k in kept], server_round)
                arrays = _to_arrayrecord(result.model, self._reference)
            except Exception as error:  # pylint: disable=broad-except
                metrics["fusion-failures"] = int(metrics["fusion-failures"]) + 1
                log(
                    WARNING,
                    "aggregate_train: fusing %d clients (nodes %s) failed (%s: %s)",
                    len(kept),
                    ", ".join(str(valid[k].node_id) for k in kept),
                    type(error).__name__,
                    error,
                )
                log(DEBUG, "aggregate_train: the fusion's traceback:\n%s", traceback.format_exc())
                if isinstance(error, TimeoutError):
                    break
                if tried == 1:
                    attempts.extend(self._retries(valid, parents))
                continue
            culprits = [valid[k].node_id for k in range(len(valid)) if k not in kept]
            if culprits:
                log(
                    WARNING,
                    "aggregate_train: the fusion failed because of node%s %s; fused without %s",
                    "s" if len(culprits) > 1 else "",
                    ", ".join(map(str, culprits)),
                    "them" if len(culprits) > 1 else "it",
                )
                metrics["fusion-failed-nodes"] = culprits
            return arrays, result, [valid[k] for k in kept]
        log(
            WARNING,
            "aggregate_train: the fusion engine failed on every subset of the %d clients tried; keeping the "
            "previous global model",
            len(valid),
        )
        return None

    def _retries(self, valid: list[TrainReply], parents: list[nn.Module]) -> list[list[int]]:
        """The subsets of clients to fuse after a failure, in order (see `_fuse_robustly`)."""
        retries = []
        screening = self._screen(valid, parents)
        if screening.left_out and len(screening.kept) >= self._needed:
            retries.append(screening.kept)
        if len(valid) - 1 >= self._needed:
            order = screening.suspicion_order()
            retries.extend([k for k in range(len(valid)) if k != suspect] for suspect in order)
        return retries

    @property
    def _reference(self) -> dict[str, ArraySpec]:
        """What every reply must match, and the fused model is returned in: the model sent out."""
        return self._sent if self._sent is not None else self._model_fn_specs()

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

    def _fuse(self, valid: list[TrainReply], parents: list[nn.Module], server_round: int) -> FusionResult:
        """Fuse the clients' models, within ``fusion_timeout``. In a `start` run, a round before the last
        fuses as `continuing` says (its clients train from the result)."""
        weights = self._weights(valid)
        config = self.fusion_config
        if self._continuing(server_round):
            config = continuing(config)

        def fusion() -> FusionResult:
            return fuse(parents, self._calibration_set, config=config, weights=weights, levels=self.levels)

        if self.fusion_timeout is None:
            return fusion()
        return _call_with_timeout(fusion, self.fusion_timeout)

    def _weights(self, valid: list[TrainReply]) -> np.ndarray | None:
        """None (the engine measures the parents on the calibration set), or the claimed counts, capped
        (`fedfuse.strategy.claims`): per-class label counts ``[K, C]`` when every client sent them,
        else ``num-examples`` ``[K]``. Claimed example counts are cross-checked in every mode, so that a
        client claiming far more than the others is named even when claims weight nothing."""
        examples = self._capped(valid, np.array([reply.num_examples for reply in valid]), "examples")
        if self.parent_weights == "calibration":
            return None
        counts = [reply.label_counts for reply in valid]
        if self.parent_weights == "num-examples":
            return examples
        if all(c is not None for c in counts):
            return self._capped(valid, np.stack(counts), "labelled examples")
        if any(c is not None for c in counts):
            log(
                WARNING,
                "aggregate_train: '%s' is not reported by every client (missing from nodes %s); "
                "weighting clients by '%s' instead",
                self.label_counts_key,
                ", ".join(str(r.node_id) for r, c in zip(valid, counts, strict=True) if c is None),
                self.weighted_by_key,
            )
        return examples

    def _capped(self, valid: list[TrainReply], claims: np.ndarray, what: str) -> np.ndarray:
        """`cap_claims`, naming every client whose claim was capped."""
        capped = cap_claims(claims, self.claim_cap)
        for k in capped.capped:
            log(
                WARNING,
                "aggregate_train: node %s claims %.3g %s, more than %g times the median claim (%.3g); %s",
                valid[k].node_id,
                float(claims[k].sum()),
                what,
                self.claim_cap,
                capped.reference,
                "claims weight nothing here (parent_weights='calibration')"
                if self.parent_weights == "calibration"
                else f"it counts as {self.claim_cap:g} times the median",
            )
        return capped.weights


def _distinct(valid: list[TrainReply]) -> tuple[list[TrainReply], list[int]]:
    """The replies with a model no earlier reply sent (`duplicates`), and the node ids of the others, each
    named in a warning."""
    repeats = duplicates(valid)
    for index, original in repeats.items():
        log(
            WARNING,
            "aggregate_train: node %s is left out: its model is identical to node %s's, which counts once",
            valid[index].node_id,
            valid[original].node_id,
        )
    kept = [reply for index, reply in enumerate(valid) if index not in repeats]
    return kept, [valid[index].node_id for index in sorted(repeats)]


def continuing(config: FusionConfig) -> FusionConfig:
    """The fusion of a round whose model the clients will train further (in a `FedFuse.start` run,
    every round but the last).

    Those clients all started from the global model the server sent, and training never moves a
    neuron to another place: neuron j of every client is neuron j of that model. So they are grouped by
    index (``grouping="index"``, the correspondence FedAvg relies on), and every fit is pulled hard
    toward the clients' average (``ridge`` at least `CONTINUING_RIDGE`): it corrects the average only
    where the calibration set firmly disagrees. Regrouped by k-means and fitted freely to a few hundred
    calibration samples, the fused model was more accurate than the average after one round but one
    that the next round's SGD trained worse, so that after five rounds FedAvg was ahead
    (docs/benchmarks.md). The last round fuses as configured. (The gradient variant has no ridge: its
    layers start from the same average, with ``level_init="aligned"``, and are trained from there.)
    Its layers keep the scales the fit gives them (``rescale="none"``): pulled toward the clients' own
    average, they are already the clients' size, and moving the scale between layers changes how the next
    round's SGD steps them (with the rescaling, two of six quickstart runs at lr 0.1 had clients diverge in
    round 2, against none without it)."""
    return replace(config, grouping="index", ridge=max(config.ridge, CONTINUING_RIDGE), rescale="none")


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
    thread, so it never holds up the interpreter's exit) and its result is dropped. One still running
    when the process exits frees its tensors while the interpreter shuts down, which aborts the process
    (torch's deallocation unwound by the thread's forced exit): give fusions the time they need, or end
    the process only after they finish.
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
