"""The frozen CLIP itself is backdoored (BadCLIP, Liang et al., CVPR 2024): the model provider is the attacker.

A server-side "attack" that does nothing during the federation: every client
loads the same backdoored checkpoint through ``pretrained`` (built by ``python -m
fedsec.backdoor_clip``), no client is malicious, and the question is whether the
prompt the federation learns on that encoder keeps, loses or removes the
backdoor (issue 14's federated view). The evaluation measures ASR with the
checkpoint's own trigger, which ships beside it as ``trigger.pt``
(``model-trigger`` names another file). The trigger is copied into the
attacker store as round 0, so ``provenance.json`` lists it with its SHA-256.
"""

from __future__ import annotations

from pathlib import Path

import torch

from fedsec.attacks.base import Attack, register_attack
from fedsec.registry import Param
from fedsec.triggers import trigger_from_dict

#: Attacker-store id of the model provider (clients use their partition id).
PROVIDER_ID = -2


def model_trigger_path(c) -> Path | None:
    """The trigger file of run config ``c``: ``model-trigger``, else ``trigger.pt`` beside a ``pretrained`` file."""
    explicit = str(c.get("model-trigger")).strip()
    if explicit:
        return Path(explicit).expanduser()
    checkpoint = Path(str(c.pretrained)).expanduser()
    return checkpoint.parent / "trigger.pt" if checkpoint.suffix in (".pt", ".pth") else None


@register_attack(
    "model-backdoor",
    params=(
        Param(
            "model-trigger",
            "",
            "trigger file of the backdoored checkpoint (empty: trigger.pt beside the pretrained file)",
            path=True,
        ),
    ),
)
class ModelBackdoor(Attack):
    """A backdoor carried by the frozen encoders; the federation is honest and ASR uses the model's trigger."""

    client_side = False
    honest_federation = True
    #: Nothing is optimised: the federation trains honestly, whatever the learner.
    image_path_learners = True

    @classmethod
    def config_problem(cls, c) -> str | None:
        """No malicious client, and a readable trigger file."""
        if c.num_malicious != 0 or str(c.get("malicious-ids")).strip():
            return (
                "run-config attack='model-backdoor' is the model provider's attack: set num-malicious=0 and "
                "malicious-ids=''"
            )
        path = model_trigger_path(c)
        if path is None:
            return (
                "run-config attack='model-backdoor' needs the backdoored checkpoint's trigger: set pretrained to "
                "the checkpoint file (its trigger.pt beside it) or model-trigger to the trigger file"
            )
        if not path.is_file():
            return f"run-config attack='model-backdoor': trigger file {str(path)!r} does not exist"
        return None

    def load_trigger(self, before_round: int | None = None):
        """The checkpoint's trigger, recorded in the attacker store as round 0 on first use."""
        if not self.store.rounds():
            state = torch.load(model_trigger_path(self.cfg), weights_only=True)
            trigger_from_dict(state)  # refuse an unreadable trigger before recording it
            self.store.save(0, PROVIDER_ID, state)
        return super().load_trigger(before_round)
