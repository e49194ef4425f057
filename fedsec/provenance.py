"""Run-directory provenance: the files and subsets behind every reported figure.

:func:`write_provenance` writes, next to ``summary.json``:

* ``provenance.json``: the model's open_clip architecture config and its SHA-256
  (a changed head count or activation loads the same weights, so the checkpoint
  hash alone does not identify the model), the checkpoint and its SHA-256, the
  target label, the evaluation subsets' rules and sizes (the denominators of
  ``clean_acc`` and ``asr``), the final figures, and the trigger behind the
  final ASR with the attacker-store files (and SHA-256) it was averaged from;
* ``eval_subsets.npz``: ``eval_idx`` (test-split indices evaluated),
  ``asr_round_idx`` (positions in ``eval_idx`` of the per-round ASR sample),
  ``asr_final_idx`` (every non-target position, used in the last round);
* ``final_trigger.npz``: the exact trigger tensors the final ASR used (no pickle).

``docs/reevaluate.md`` recomputes the final figures from these files with
open_clip and numpy only.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def trigger_sources(store, run_dir) -> dict:
    """The attacker-store files the evaluation's trigger averages (newest round), with their SHA-256.

    Parameters
    ----------
    store : fedsec.attacks.store.AttackerStore
        The run's attacker store.
    run_dir : fedsec.rundir.RunDir
        The run directory (paths are recorded relative to it).
    """
    from fedsec.models.factory import sha256_file

    rounds = store.rounds()
    if not rounds:
        return {}
    files = sorted((store.path / f"round_{rounds[-1]:04d}").glob("p*.pt"))
    root = Path(run_dir.path)
    return {
        "round": rounds[-1],
        "files": [
            {"path": str(f.relative_to(root)) if f.is_relative_to(root) else str(f), "sha256": sha256_file(f)}
            for f in files
        ],
        "combined": "mean of the files' float tensors (fedsec.triggers.average_triggers)",
    }


def write_provenance(ev) -> None:
    """Write ``provenance.json``, ``eval_subsets.npz`` and ``final_trigger.npz`` for a finished evaluation.

    Parameters
    ----------
    ev : fedsec.evaluation.Evaluation
        The run's evaluation after its last round.
    """
    from fedsec.models.checkpoint import architecture_config, config_sha256

    arch = architecture_config(ev.cfg.model)
    nontarget = np.flatnonzero(ev.test.labels != ev.cfg.target_label)
    np.savez(
        ev.run_dir.path / "eval_subsets.npz",
        eval_idx=ev.eval_idx,
        asr_round_idx=np.asarray(ev.asr_idx, dtype=np.int64),
        asr_final_idx=nontarget.astype(np.int64),
    )
    trigger = None
    if ev.final_trigger is not None:
        state = ev.final_trigger["state"]
        arrays = {k: v.detach().cpu().numpy() for k, v in state.items() if isinstance(v, torch.Tensor)}
        scalars = {k: v for k, v in state.items() if not isinstance(v, torch.Tensor)}
        np.savez(ev.run_dir.path / "final_trigger.npz", **arrays)
        trigger = {"file": "final_trigger.npz", **scalars, "sources": ev.final_trigger["sources"]}
    last = ev.history[-1] if ev.history else {}
    prov = {
        "architecture": {"model": ev.cfg.model, "open_clip_config": arch, "config_sha256": config_sha256(arch)},
        "checkpoint": {"path": ev.clip.checkpoint, "sha256": ev.clip.checkpoint_sha256},
        "target_label": ev.cfg.target_label,
        "evaluation": {
            "split": "test",
            "split_size": ev.test_size,
            "eval_samples": len(ev.eval_idx),
            "eval_idx": "eval_subsets.npz:eval_idx (indices into the split; "
            "numpy default_rng(seed).choice(split_size, eval-samples, replace=False), sorted; all when 0)",
            "asr_round_idx": "eval_subsets.npz:asr_round_idx (positions in eval_idx; non-target images, "
            "default_rng(seed).choice(non-target positions, asr-eval-samples, replace=False), sorted, "
            "drawn after eval_idx from a fresh default_rng(seed); all when 0), rounds before the last",
            "asr_final_idx": "eval_subsets.npz:asr_final_idx (every non-target position in eval_idx), last round",
            "clean_acc_denominator": len(ev.eval_idx),
            "asr_round_denominator": len(ev.asr_idx),
            "asr_final_denominator": len(nontarget),
            "final_round": last.get("round"),
            "final_clean_acc": last.get("clean_acc"),
            "final_asr": last.get("asr"),
            "final_trigger_only_asr": last.get("trigger_only_asr"),
        },
        "trigger": trigger,
        "activation_bounds": (
            "final_bounds.npz: clean_acc/asr are with these clamps, clean_acc_nobounds/asr_nobounds without"
            if ev.bounds is not None
            else None
        ),
        "trigger_only_asr": (
            "the same trigger under shadow_ctx (checkpoints/round_NNNN.npz): the prompt of a FedAvg federation of "
            "the benign clients alone, trained by them beside the real one (fedsec/shadow.py; shadow_replies per "
            "round); its clean accuracy is shadow_clean_acc"
            if ev.shadow_federation
            else "the same trigger under the global prompt itself (shadow_ctx = ctx): no client and no server-side "
            "data is attacked, so the global prompt is the benign-only prompt"
            if ev.attack.honest_federation
            else "the same trigger under shadow_ctx (checkpoints/round_NNNN.npz): the initial prompt plus the running "
            "sum of the benign clients' mean update (shadow-federation = false, or no client-side attacker; "
            "docs/reevaluate.md); its clean accuracy is shadow_clean_acc: a shadow far below the global prompt's "
            "is no benign-only baseline (docs/ceiling.md)"
        ),
    }
    ev.run_dir.write_json("provenance.json", prov)
