"""A Flower Grid that shows a progress bar over the clients' replies while a round is out.

The clients train in Flower's simulation runtime (Ray worker processes), where a progress bar of
their own would be interleaved line by line into the harness's output. The ServerApp's Grid is where
replies arrive, one by one as clients finish, so the harness draws the training bar there.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import TYPE_CHECKING

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid
from tqdm.auto import tqdm

if TYPE_CHECKING:
    from flwr.supercore.run import Run  # where Flower 1.41 defines the type of Grid.run

#: Seconds between pulls for replies (Flower's in-memory Grid pulls every 0.1 s too).
POLL_SECONDS = 0.1


class ProgressGrid(Grid):
    """Delegates everything to ``grid``; ``send_and_receive`` also advances a bar, one step per reply.

    Args:
        grid: the Grid Flower gave the ServerApp.
        description: the bar's label; the round number (counted by this Grid) is appended.
        enabled: draw the bar (False: behave exactly like ``grid``).
    """

    def __init__(self, grid: Grid, description: str, enabled: bool) -> None:
        self._grid = grid
        self._description = description
        self._enabled = enabled
        self._rounds = 0

    def set_run(self, run: Run) -> None:
        self._grid.set_run(run)

    @property
    def run(self) -> Run:
        return self._grid.run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return self._grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self._grid.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._grid.pull_messages(message_ids)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Push ``messages`` and pull replies until every one has replied or ``timeout`` seconds passed.

        As Flower's own Grids do; a round with no messages (federated evaluation switched off) draws
        no bar and does not count as a round.
        """
        pending = set(self.push_messages(messages))
        if not pending:
            return []
        self._rounds += 1
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        with tqdm(
            total=len(pending),
            desc=f"{self._description} {self._rounds}",
            unit="client",
            disable=not self._enabled,
            leave=False,
            mininterval=1.0,
        ) as bar:
            while pending and (deadline is None or time.monotonic() < deadline):
                arrived = list(self.pull_messages(pending))
                replies += arrived
                pending -= {reply.metadata.reply_to_message_id for reply in arrived}
                bar.update(len(arrived))  # redraws at most once a second: elapsed time moves on
                if pending:
                    time.sleep(POLL_SECONDS)
        return replies
