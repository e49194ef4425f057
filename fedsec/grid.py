"""A deployment ``Grid`` that polls for replies more often than Flower's fixed 3 s.

Flower 1.41's ``HttpGrid.send_and_receive`` (the grid of a ServerApp in a deployment)
pushes a round's messages, then pulls replies and sleeps a fixed 3 s between pulls
(not configurable), so a round ends on average 1.5 s and at most 3 s after its last
reply. :func:`fast_polling` wraps that grid with the same loop and a shorter sleep
(``FEDSEC_GRID_POLL_S``, default 0.5 s; one small ``PullMessages`` request per poll).
The simulation's ``InMemoryGrid`` already polls every 0.1 s and is returned as is.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.run import Run

#: Seconds between reply pulls of a wrapped deployment grid (Flower's own: 3 s).
DEFAULT_POLL_S = 0.5


class PollingGrid(Grid):
    """Delegates to ``grid``; :meth:`send_and_receive` sleeps ``interval`` seconds between pulls.

    Parameters
    ----------
    grid : Grid
        The grid Flower gave the ServerApp.
    interval : float
        Seconds between two reply pulls (> 0).
    """

    def __init__(self, grid: Grid, interval: float = DEFAULT_POLL_S) -> None:
        if not interval > 0:
            raise ValueError(f"poll interval must be > 0, got {interval}")
        self.grid = grid
        self.interval = float(interval)

    def set_run(self, run: Run) -> None:
        """As ``Grid.set_run`` of the wrapped grid."""
        self.grid.set_run(run)

    @property
    def run(self) -> Run:
        """The wrapped grid's run."""
        return self.grid.run

    def create_message(
        self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str, ttl: float | None = None
    ) -> Message:
        """As ``Grid.create_message`` of the wrapped grid."""
        return self.grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        """As ``Grid.get_node_ids`` of the wrapped grid."""
        return self.grid.get_node_ids()

    def get_nodes(self) -> Iterable:
        """As ``Grid.get_nodes`` of the wrapped grid."""
        return self.grid.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """As ``Grid.push_messages`` of the wrapped grid."""
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """As ``Grid.pull_messages`` of the wrapped grid."""
        return self.grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Push ``messages``, then pull replies every ``interval`` s until all came or ``timeout`` s passed.

        The loop of Flower 1.41's ``HttpGrid.send_and_receive`` with its 3 s sleep replaced.
        """
        msg_ids = set(self.push_messages(messages))
        del messages
        end_time = time.time() + (timeout if timeout is not None else 0.0)
        ret: list[Message] = []
        while timeout is None or time.time() < end_time:
            replies = list(self.pull_messages(msg_ids))
            ret.extend(replies)
            msg_ids.difference_update({m.metadata.reply_to_message_id for m in replies})
            if not msg_ids:
                break
            time.sleep(self.interval)
        return ret

    def __getattr__(self, name: str) -> object:
        """Anything else the concrete grid offers (``close``, ...) goes to it."""
        if name == "grid":
            raise AttributeError(name)
        return getattr(self.grid, name)


def fast_polling(grid: Grid, interval: float | None = None) -> Grid:
    """``grid`` wrapped in :class:`PollingGrid` if it is a deployment's ``HttpGrid``, else ``grid``.

    Parameters
    ----------
    grid : Grid
        The ServerApp's grid.
    interval : float, optional
        Seconds between reply pulls; default ``$FEDSEC_GRID_POLL_S`` or :data:`DEFAULT_POLL_S`.
    """
    from flwr.superlink.grid.http_grid import HttpGrid

    if not isinstance(grid, HttpGrid):
        return grid
    if interval is None:
        interval = float(os.environ.get("FEDSEC_GRID_POLL_S", DEFAULT_POLL_S))
    return PollingGrid(grid, interval)
