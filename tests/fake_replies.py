"""Flower replies for tests of the harness's strategies, without a running federation.

Flower's ``Message`` cannot be built outside a running app; replies are faked with ``Mock(spec=Message)``,
as Flower's own strategy tests do.
"""

from __future__ import annotations

from unittest.mock import Mock

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict


def train_reply(
    partition_id: int, value: float, *, size: int = 3, examples: int = 10, message_id: str | None = None
) -> Mock:
    """A valid training reply of client ``partition_id`` (node 100 + partition_id): one array ``"w"`` of
    ``size`` values equal to ``value``, answering ``message_id`` when given."""
    message = Mock(spec=Message)
    message.has_error.return_value = False
    message.content = RecordDict(
        {
            "arrays": ArrayRecord({"w": Array(np.full(size, value, dtype=np.float32))}),
            "metrics": MetricRecord({"num-examples": examples, "partition-id": partition_id}),
        }
    )
    if message_id is not None:
        message.metadata.reply_to_message_id = message_id
    message.metadata.src_node_id = 100 + partition_id
    return message


def error_reply(reason: str, *, node_id: int, message_id: str | None = None) -> Mock:
    """An error reply from ``node_id`` (1: the SuperLink, replying in a dead node's place)."""
    message = Mock(spec=Message)
    message.has_error.return_value = True
    message.error.reason = reason
    if message_id is not None:
        message.metadata.reply_to_message_id = message_id
    message.metadata.src_node_id = node_id
    return message
