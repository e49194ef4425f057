"""Evaluation on the server test set: clean accuracy, ASR, detection and stealth.

Only the evaluation knows the trigger (read from the attacker store) and which
clients are malicious; no defense ever receives either.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
import torch.nn.functional as F

from fedsec.models.prompt import PromptCLIP


@torch.no_grad()
def predict(model: PromptCLIP, features: torch.Tensor, ctx: torch.Tensor | None = None) -> torch.Tensor:
    """Predicted labels for cached image features under ``ctx`` (default: the model's)."""
    if len(features) == 0:
        return torch.empty(0, dtype=torch.long)
    dev = model.prompt_learner.ctx.device
    return model.logits_from_features(features.to(dev), ctx).argmax(-1).cpu()


def accuracy(pred: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray) -> float:
    """Top-1 accuracy."""
    pred, labels = np.asarray(pred), np.asarray(labels)
    return float((pred == labels).mean()) if len(labels) else float("nan")


def attack_success_rate(pred: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray, target: int) -> float:
    """ASR: among examples whose true label is not ``target``, the share predicted as ``target``.

    ``pred`` are predictions on the *triggered* inputs.
    """
    pred, labels = np.asarray(pred), np.asarray(labels)
    keep = labels != target
    return float((pred[keep] == target).mean()) if keep.any() else float("nan")


@torch.no_grad()
def zero_shot_accuracy(clip, classnames: list[str], features: torch.Tensor, labels, template: str) -> float:
    """Accuracy of a hand-written prompt ``template`` through ``encode_text``."""
    tokens = clip.tokenizer([template.format(c) for c in classnames]).to(clip.device)
    text = F.normalize(clip.model.encode_text(tokens), dim=-1)
    pred = (features.to(clip.device) @ text.T).argmax(-1).cpu()
    return accuracy(pred, labels)


def detection_rates(flagged: Iterable[int], malicious: Iterable[int], population: Iterable[int]) -> dict[str, float]:
    """TPR and FPR of a defense's flags against the true malicious set.

    Parameters
    ----------
    flagged : iterable of int
        Clients the defense excluded or down-weighted this round.
    malicious : iterable of int
        The truly malicious clients among ``population``.
    population : iterable of int
        Clients that took part.
    """
    pop = set(population)
    flagged, malicious = set(flagged) & pop, set(malicious) & pop
    benign = pop - malicious
    tpr = len(flagged & malicious) / len(malicious) if malicious else float("nan")
    fpr = len(flagged & benign) / len(benign) if benign else float("nan")
    return {"tpr": tpr, "fpr": fpr}


def update_stealth(updates: dict[int, np.ndarray], malicious: Iterable[int]) -> dict[str, float]:
    """Cosine distance of malicious updates to the benign mean update, and norms.

    Parameters
    ----------
    updates : dict
        Client id -> flattened update (client ctx minus global ctx).
    malicious : iterable of int
        Malicious client ids.
    """
    mal = sorted(k for k in updates if k in set(malicious))  # sorted: sums do not depend on reply arrival order
    ben = sorted(k for k in updates if k not in set(malicious))
    out = {
        "mal_cos_dist": float("nan"),
        "benign_cos_dist": float("nan"),
        "mal_norm": float("nan"),
        "benign_norm": float("nan"),
    }
    if not ben:
        return out
    mean = np.mean([updates[k] for k in ben], axis=0)

    def cos_dist(u: np.ndarray) -> float:
        d = np.linalg.norm(u) * np.linalg.norm(mean)
        return float(1.0 - u @ mean / d) if d > 0 else float("nan")

    out["benign_cos_dist"] = float(np.mean([cos_dist(updates[k]) for k in ben]))
    out["benign_norm"] = float(np.mean([np.linalg.norm(updates[k]) for k in ben]))
    if mal:
        out["mal_cos_dist"] = float(np.mean([cos_dist(updates[k]) for k in mal]))
        out["mal_norm"] = float(np.mean([np.linalg.norm(updates[k]) for k in mal]))
    return out


def target_rates(
    triggered: torch.Tensor | np.ndarray,
    clean: torch.Tensor | np.ndarray,
    labels: torch.Tensor | np.ndarray,
    target: int,
    prompts: dict[str, torch.Tensor | np.ndarray],
) -> dict[str, float]:
    """The ASR of every prompt on triggered images, and the global prompt's target rate on clean ones.

    A backdoor's ASR only means something against two baselines (BadPromptFL,
    arXiv 2508.08040, reports both): what the trigger does *alone* — under the
    hand-written zero-shot prompt and under the benign-only prompt — and how
    often clean images already land on the target.

    Parameters
    ----------
    triggered, clean : array, ``n x E``
        L2-normalised image features of the same ``n`` images with and without the trigger.
    labels : array, ``n``
        True labels (images of the target class are left out of every rate).
    target : int
        The backdoor target class.
    prompts : dict
        Name -> class text features ``C x E`` (L2-normalised); must hold ``"global"``.

    Returns
    -------
    dict
        ``asr_<name>`` for every prompt (triggered images predicted as ``target``) and
        ``clean_target_rate`` (clean images predicted as ``target`` under the global prompt).
    """
    triggered, clean = np.asarray(triggered, dtype=np.float64), np.asarray(clean, dtype=np.float64)
    out = {}
    for name, text in prompts.items():
        pred = (triggered @ np.asarray(text, dtype=np.float64).T).argmax(-1)
        out[f"asr_{name}"] = attack_success_rate(pred, labels, target)
    pred_clean = (clean @ np.asarray(prompts["global"], dtype=np.float64).T).argmax(-1)
    out["clean_target_rate"] = attack_success_rate(pred_clean, labels, target)
    return out
