"""Checking one client's training reply before it is fused.

Flower's own check (``FedAvg._check_and_log_replies``) raises when a single reply is malformed, which
ends the whole ServerApp. Fusion has to survive one bad client, so every reply is checked here on its
own: a bad reply raises `InvalidReply` with a reason, the strategy leaves that client out and fuses the
rest. The checks run on what Flower decoded from the wire, before any model is built, so that a client
cannot make the server fuse, or crash on, arrays that do not fit the global model.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

_Record = TypeVar("_Record")


class InvalidReply(ValueError):
    """A training reply that cannot be fused; ``reason`` says why, for the warning that names the node."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class ArraySpec:
    """The shape and dtype that one array of a reply must have: those of the global model's array."""

    shape: tuple[int, ...]
    dtype: np.dtype


@dataclass(frozen=True)
class TrainReply:
    """A checked training reply, decoded.

    Attributes:
        node_id: the replying node.
        arrays: the client's model, one array per key, in the order of the reference.
        num_examples: the client's weight (the value of the strategy's ``weighted_by_key``).
        label_counts: the client's opt-in per-class example counts, float64 [C], or None.
        content: the reply's RecordDict, for the strategy's metric aggregation.
    """

    node_id: int
    arrays: dict[str, np.ndarray]
    num_examples: float
    label_counts: np.ndarray | None
    content: RecordDict


def array_specs(record: ArrayRecord) -> dict[str, ArraySpec]:
    """What every reply must match: each array's shape and dtype, read from the record's metadata."""
    return {key: ArraySpec(tuple(array.shape), np.dtype(array.dtype)) for key, array in record.items()}


def node_of(message: Message, recipients: Mapping[str, int]) -> int:
    """The node a reply speaks for: the node the instruction it answers was sent to.

    A reply a node sent comes from that node (``src_node_id``). A reply Flower generates in the node's
    place (a dead node's "Node Unavailable", an expired message) comes from the SuperLink: Flower sets
    both its ``src_node_id`` and its ``dst_node_id`` to the SuperLink's id (1). Only its
    ``reply_to_message_id`` says which instruction, and so which node, it is about.

    Args:
        recipients: the ids of the instructions sent this round, mapped to the node each was sent to.
    """
    node = recipients.get(message.metadata.reply_to_message_id)
    return int(message.metadata.src_node_id) if node is None else int(node)


def check_train_reply(
    message: Message,
    reference: Mapping[str, ArraySpec],
    *,
    node_id: int,
    weighted_by_key: str,
    label_counts_key: str,
    num_classes: int | None = None,
) -> TrainReply:
    """Decode and check one training reply against the global model it was trained from.

    A reply is valid when it carries no error; exactly one ArrayRecord with exactly the reference's keys,
    each array decodable, of the reference's shape and dtype and finite; and exactly one MetricRecord
    with a positive, finite ``weighted_by_key``. ``label_counts_key`` is optional; when present it must
    be a list of non-negative finite counts with a positive sum, one per class when ``num_classes`` is
    given (the model's outputs).

    Raises:
        InvalidReply: the first problem found, worded to follow "node <id> is left out: ".
    """
    if message.has_error():
        raise InvalidReply(f"it replied with an error (code {message.error.code}): {message.error.reason}")
    content = message.content
    arrays = _check_arrays(_only_record(content.array_records, "ArrayRecord"), reference)
    metrics = _only_record(content.metric_records, "MetricRecord")
    return TrainReply(
        node_id=node_id,
        arrays=arrays,
        num_examples=_check_num_examples(metrics, weighted_by_key),
        label_counts=_check_label_counts(metrics, label_counts_key, num_classes),
        content=content,
    )


def _only_record(records: Mapping[str, _Record], kind: str) -> _Record:
    """The single record of a kind; FedAvg's clients send exactly one of each, and so must ours."""
    if len(records) != 1:
        found = f"{len(records)} ({', '.join(map(repr, records))})" if records else "none"
        raise InvalidReply(f"its reply must carry exactly one {kind}, found {found}")
    return next(iter(records.values()))


def _check_arrays(record: ArrayRecord, reference: Mapping[str, ArraySpec]) -> dict[str, np.ndarray]:
    missing = [key for key in reference if key not in record]
    if missing:
        raise InvalidReply(f"its ArrayRecord misses {_names(missing)}")
    extra = [key for key in record if key not in reference]
    if extra:
        raise InvalidReply(f"its ArrayRecord has unexpected {_names(extra)}")
    arrays = {}
    for key, spec in reference.items():
        try:
            array = record[key].numpy()
        except Exception as error:  # corrupt bytes, an unknown serialisation: anything numpy refuses
            raise InvalidReply(
                f"array '{key}' cannot be decoded ({type(error).__name__}: {error})"
            ) from error
        if tuple(array.shape) != spec.shape:
            raise InvalidReply(f"array '{key}' has shape {tuple(array.shape)}, expected {spec.shape}")
        if array.dtype != spec.dtype:
            raise InvalidReply(f"array '{key}' has dtype {array.dtype}, expected {spec.dtype}")
        if np.issubdtype(array.dtype, np.inexact) and not np.isfinite(array).all():
            raise InvalidReply(f"array '{key}' holds NaN or Inf")
        arrays[key] = array
    return arrays


def _check_num_examples(metrics: MetricRecord, key: str) -> float:
    if key not in metrics:
        raise InvalidReply(f"its MetricRecord has no '{key}'")
    value = metrics[key]
    if isinstance(value, list) or not math.isfinite(value) or value <= 0:
        raise InvalidReply(f"'{key}' must be a positive finite number, got {value!r}")
    return float(value)


def _check_label_counts(metrics: MetricRecord, key: str, num_classes: int | None) -> np.ndarray | None:
    if key not in metrics:
        return None
    value = metrics[key]
    counts = np.asarray(value, dtype=np.float64) if isinstance(value, list) else None
    if (
        counts is None
        or counts.size == 0
        or not np.isfinite(counts).all()
        or (counts < 0).any()
        or counts.sum() <= 0
    ):
        raise InvalidReply(
            f"'{key}' must be a list of non-negative finite counts with a positive sum, got {value!r}"
        )
    if num_classes is not None and counts.size != num_classes:
        raise InvalidReply(f"'{key}' must hold one count per class ({num_classes}), got {counts.size} counts")
    return counts


def _names(keys: list[str], shown: int = 3) -> str:
    """``'a', 'b', 'c' and 2 more``: enough to find the problem without flooding the log."""
    names = ", ".join(repr(key) for key in keys[:shown])
    more = f" and {len(keys) - shown} more" if len(keys) > shown else ""
    return f"{len(keys)} array{'s' if len(keys) > 1 else ''}: {names}{more}"


def duplicates(replies: list[TrainReply]) -> dict[int, int]:
    """The replies whose model is identical, array for array, to an earlier one's: index → index of the
    first reply with that model. Honest clients train on their own data and never send the same model;
    several nodes that do (Sybils, or free riders returning the model they were sent) count once."""
    first: dict[bytes, int] = {}
    repeats = {}
    for index, reply in enumerate(replies):
        digest = hashlib.sha256()
        for key, array in reply.arrays.items():
            digest.update(key.encode())
            digest.update(np.ascontiguousarray(array).tobytes())
        repeats_of = first.setdefault(digest.digest(), index)
        if repeats_of != index:
            repeats[index] = repeats_of
    return repeats
