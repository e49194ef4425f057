"""``fedsec.grid``: the deployment grid's reply polling."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from fedsec import grid as fgrid


class _FakeGrid:
    """Replies to message ``i`` become available at the ``i``-th pull (1-based)."""

    def __init__(self, n: int) -> None:
        self.n, self.pulls, self.closed = n, 0, False

    def push_messages(self, messages):
        return [f"m{i}" for i, _ in enumerate(messages, start=1)]

    def pull_messages(self, message_ids):
        self.pulls += 1
        ready = {f"m{i}" for i in range(1, self.pulls + 1)} & set(message_ids)
        return [SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=m)) for m in sorted(ready)]

    def close(self) -> None:
        self.closed = True


def test_polls_at_its_interval_until_every_reply_came(monkeypatch):
    # Prepare
    sleeps: list[float] = []
    monkeypatch.setattr(fgrid.time, "sleep", sleeps.append)
    inner = _FakeGrid(3)
    g = fgrid.PollingGrid(inner, interval=0.25)
    # Execute
    replies = g.send_and_receive(["a", "b", "c"], timeout=60)
    # Assert
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["m1", "m2", "m3"]
    assert inner.pulls == 3 and sleeps == [0.25, 0.25]


def test_timeout_returns_what_came(monkeypatch):
    # Prepare: a clock that advances one second per sleep
    now = [1000.0]
    monkeypatch.setattr(fgrid.time, "time", lambda: now[0])
    monkeypatch.setattr(fgrid.time, "sleep", lambda s: now.__setitem__(0, now[0] + 1.0))
    g = fgrid.PollingGrid(_FakeGrid(100), interval=1.0)
    # Execute
    replies = g.send_and_receive([object()] * 10, timeout=3.0)
    # Assert
    assert len(replies) == 3


def test_other_attributes_go_to_the_wrapped_grid_and_bad_interval_is_refused():
    # Prepare
    inner = _FakeGrid(1)
    # Execute
    fgrid.PollingGrid(inner).close()
    # Assert
    assert inner.closed
    with pytest.raises(ValueError, match="> 0"):
        fgrid.PollingGrid(inner, interval=0)


def test_only_a_deployment_grid_is_wrapped(monkeypatch):
    # Prepare
    from flwr.superlink.grid.http_grid import HttpGrid
    from flwr.superlink.grid.inmemory_grid import InMemoryGrid

    http = HttpGrid.__new__(HttpGrid)  # no connection needed: only its type matters
    memory = InMemoryGrid.__new__(InMemoryGrid)
    monkeypatch.setenv("FEDSEC_GRID_POLL_S", "0.2")
    # Execute
    wrapped, untouched = fgrid.fast_polling(http), fgrid.fast_polling(memory)
    # Assert
    assert isinstance(wrapped, fgrid.PollingGrid) and wrapped.grid is http and wrapped.interval == 0.2
    assert untouched is memory
