"""The attacker store: how colluding malicious clients share one trigger across rounds.

An absolute folder (``<run-dir>/attacker``) that every malicious client of a
run can reach (one machine, or a shared file system in a deployment). In round
``r`` each malicious client writes its optimised trigger to
``round_RRRR/pPID.pt``; in round ``r + 1`` every malicious client starts from the
average of round ``r``'s triggers. The result does not depend on which client
finishes first, and the evaluation reads the same average. Files are written
atomically (temp file + rename).

Colluders may also pool what they hold (``trigger-pool``): each writes its own
item once to ``shared/KIND/pPID.pt`` with the round it was written in, and a
reader in round ``r`` sees only items written before ``r``, so what a client
reads never depends on the order in which clients run within a round.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from fedsec.triggers import average_triggers


class AttackerStore:
    """Per-round trigger files of the colluding attackers.

    Parameters
    ----------
    path : pathlib.Path
        Absolute store folder.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def save(self, server_round: int, partition_id: int, state: dict) -> Path:
        """Write one attacker's trigger for ``server_round``."""
        return self._write(self.path / f"round_{server_round:04d}", f"p{partition_id}.pt", state)

    def _write(self, folder: Path, name: str, state: dict) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        out = folder / name
        fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
        os.close(fd)
        torch.save(state, tmp)
        os.replace(tmp, out)
        return out

    def share(self, kind: str, server_round: int, partition_id: int, state: dict) -> None:
        """Offer this attacker's ``state`` to its colluders, once (an existing item is kept)."""
        folder = self.path / "shared" / kind
        if not (folder / f"p{partition_id}.pt").exists():
            self._write(folder, f"p{partition_id}.pt", {"round": int(server_round), "state": state})

    def shared(self, kind: str, before_round: int) -> dict[int, dict]:
        """The colluders' items of ``kind`` written strictly before ``before_round``, by partition id."""
        folder = self.path / "shared" / kind
        items: dict[int, dict] = {}
        for f in sorted(folder.glob("p*.pt")) if folder.exists() else []:
            item = torch.load(f, weights_only=False)
            if int(item["round"]) < before_round:
                items[int(f.stem[1:])] = item["state"]
        return dict(sorted(items.items()))

    def rounds(self) -> list[int]:
        """Rounds that have at least one trigger file."""
        if not self.path.exists():
            return []
        return sorted(int(p.name[6:]) for p in self.path.glob("round_*") if any(p.glob("p*.pt")))

    def load(self, before_round: int | None = None) -> dict | None:
        """Average trigger of the newest round (strictly before ``before_round`` if given)."""
        rounds = [r for r in self.rounds() if before_round is None or r < before_round]
        if not rounds:
            return None
        files = sorted((self.path / f"round_{rounds[-1]:04d}").glob("p*.pt"))
        return average_triggers([torch.load(f, weights_only=False) for f in files])
