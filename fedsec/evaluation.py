"""Server-side evaluation of every round, run-directory writing and the progress line.

This is the only place that knows the attack (trigger and malicious set):
it computes clean accuracy, ASR, detection and stealth metrics for the
record, and never hands any of it to the strategy.
"""

from __future__ import annotations

import time
from logging import INFO

import numpy as np
import torch
from flwr.common.logger import log

from fedsec.activation_bounds import ActivationBounds, bounded
from fedsec.attacks import get_attack, malicious_partitions
from fedsec.config import RunConfig
from fedsec.data import load_dataset, prepare_images
from fedsec.metrics import (
    accuracy,
    attack_success_rate,
    detection_rates,
    predict,
    target_rates,
    update_stealth,
    zero_shot_accuracy,
)
from fedsec.node import clip_for, get_arrays, get_ctx, learner_model_for, set_arrays, test_features
from fedsec.provenance import trigger_sources, write_provenance
from fedsec.rundir import RunDir


class Evaluation:
    """Evaluates the global prompt on the held-out test set after every round.

    Parameters
    ----------
    cfg : RunConfig
        The run config.
    run_dir : RunDir
        Where metrics, checkpoints and the summary go.
    num_partitions : int
        Federation size (to know the malicious set, evaluation only).
    """

    def __init__(self, cfg: RunConfig, run_dir: RunDir, num_partitions: int) -> None:
        self.cfg = cfg
        self.run_dir = run_dir
        self.num_partitions = num_partitions
        self.t_start = time.perf_counter()
        self.t_last = self.t_start
        self.clip = clip_for(cfg)
        self.test = load_dataset(cfg.dataset, "test", cfg.data_root)
        keep = None
        self.test_size = len(self.test)
        if cfg.eval_samples and cfg.eval_samples < len(self.test):
            keep = np.sort(np.random.default_rng(cfg.seed).choice(len(self.test), size=cfg.eval_samples, replace=False))
            self.test = self.test.subset(keep)
        self.eval_idx = np.arange(self.test_size) if keep is None else np.asarray(keep, dtype=np.int64)
        self.classnames = list(self.test.classnames)
        self.model = learner_model_for(cfg, tuple(self.classnames))
        self.images = prepare_images(self.test.images, self.clip.image_size, self.test.fit)
        self.labels = torch.from_numpy(self.test.labels)
        self.features = test_features(self.clip, cfg.dataset, cfg.data_root, keep, self.images)  # disk-cached
        self.zero_shot_acc = zero_shot_accuracy(
            self.clip, self.classnames, self.features, self.labels, cfg.prompt_template
        )
        self.malicious = (
            malicious_partitions(num_partitions, cfg.num_malicious, cfg.seed, str(cfg.get("malicious-ids")))
            if cfg.attack != "none"
            else []
        )
        self.attack = get_attack(cfg.attack)(cfg, run_dir.path / "attacker")
        self.history: list[dict] = []
        self.init_ctx = get_ctx(self.model)
        self.init_arrays = get_arrays(self.model)  # what travels: ctx for CoOp, vpt for visual prompts
        #: The benign-only shadow federation's learned arrays (``ctx``, ``vpt``...; :mod:`fedsec.shadow`).
        self.shadow_arrays = self.initial_arrays()
        #: Whether the benign clients train the shadow prompt themselves (fedsec.shadow); else the
        #: shadow accumulates the mean benign update (the earlier form; exact when no client attacks).
        self.shadow_federation = bool(cfg.shadow_federation and self.malicious and self.attack.client_side)
        self.round_info: dict = {}
        self.bounds: ActivationBounds | None = None  # activation bounds the server sends to clients, if any
        self.final_trigger: dict | None = None  # the trigger behind the final ASR and its source files
        n_asr = cfg.asr_eval_samples
        nontarget = np.flatnonzero(self.test.labels != cfg.target_label)
        rng = np.random.default_rng(cfg.seed)
        self.asr_idx = (
            np.sort(rng.choice(nontarget, size=min(n_asr, len(nontarget)), replace=False)) if n_asr else nontarget
        )

    # ---------------------------------------------------------------- API
    def restore(self, arrays: dict[str, np.ndarray]) -> None:
        """Continue an interrupted run: its metric history, benign-only shadow prompt and activation bounds."""
        self.history = self.run_dir.metrics()
        for name in self.init_arrays:
            if f"shadow_{name}" in arrays:
                self.shadow_arrays[name] = np.asarray(arrays[f"shadow_{name}"], dtype=np.float32)
        bounds = {k[len("bounds:") :]: v for k, v in arrays.items() if k.startswith("bounds:")}
        if bounds:
            self.bounds = ActivationBounds.from_arrays(bounds)
        if self.history and "elapsed_s" in self.history[-1]:
            self.t_start -= float(self.history[-1]["elapsed_s"])

    def initial_ctx(self) -> np.ndarray:
        """The initial global ctx (from ``ctx-init`` or a seeded random init)."""
        return self.init_ctx.copy()

    def initial_arrays(self) -> dict[str, np.ndarray]:
        """The initial global learned arrays, by name (``ctx`` for CoOp; see ``fedsec.models.learners``)."""
        return {k: v.copy() for k, v in self.init_arrays.items()}

    @property
    def shadow_ctx(self) -> np.ndarray:
        """The shadow's text context (the fixed initial one when the learner does not learn ``ctx``)."""
        return self.shadow_arrays.get("ctx", self.init_ctx)

    @shadow_ctx.setter
    def shadow_ctx(self, ctx: np.ndarray) -> None:
        self.shadow_arrays["ctx"] = np.asarray(ctx, dtype=np.float32)

    def note_round(self, info: dict) -> None:
        """Training-side facts of the round (from the recorder), merged into the metrics row.

        Without the shadow federation, also advances the benign-only shadow prompt by the mean
        benign update (the earlier form; see :mod:`fedsec.shadow`).
        """
        records = info.pop("records", {})
        if "bounds" in records:
            self.bounds = ActivationBounds.from_arrays(records["bounds"])
        self.round_info = info
        benign = [u for pid, u in info.get("updates", {}).items() if pid not in self.malicious]
        if benign and not self.shadow_federation and set(self.init_arrays) == {"ctx"}:
            step = np.mean(benign, axis=0).reshape(self.shadow_ctx.shape).astype(np.float32)
            self.shadow_ctx = self.shadow_ctx + step

    def benign_nodes(self) -> list[int]:
        """Node ids of the round's replying benign clients (from :meth:`note_round`), for the shadow federation."""
        parts = self.round_info.get("partitions", {})
        return sorted(node for node, pid in parts.items() if pid not in self.malicious)

    def set_shadow(self, arrays: dict[str, np.ndarray], replies: int) -> None:
        """The shadow federation's new learned arrays after this round, trained by ``replies`` benign clients."""
        self.shadow_arrays = {k: np.asarray(v, dtype=np.float32) for k, v in arrays.items()}
        self.round_info["shadow_replies"] = replies

    @torch.no_grad()
    def zero_shot_text(self) -> torch.Tensor:
        """Class text features of the hand-written ``prompt-template`` (under any active bounds)."""
        tokens = self.clip.tokenizer([self.cfg.prompt_template.format(c) for c in self.classnames])
        return torch.nn.functional.normalize(self.clip.model.encode_text(tokens.to(self.clip.device)), dim=-1)

    def backdoor_metrics(
        self,
        ctx: np.ndarray,
        server_round: int,
        full: bool = False,
        clean_features: torch.Tensor | None = None,
        bounds: ActivationBounds | None = None,
        frozen_clean: torch.Tensor | None = None,
    ) -> dict:
        """ASR of ``ctx``, the trigger's baselines and its size, with the attackers' newest trigger.

        Two trigger-alone baselines: ``trigger_only_asr`` applies the same trigger
        to the *benign-only shadow prompt* (the prompt of a FedAvg federation of
        the benign clients alone, run beside the real one: :mod:`fedsec.shadow`), ``trigger_zs_asr``
        to the hand-written zero-shot prompt (``prompt-template``); and
        ``clean_target_rate``, the share of the same images *without* the
        trigger that ``ctx`` already predicts as the target. All on the same
        non-target images as ``asr``. ``shadow_clean_acc`` is the shadow prompt's clean
        accuracy, the check that the shadow is a working prompt (with
        ``shadow-federation = false`` the shadow is the earlier accumulated mean
        benign update, computed from the poisoned global prompt, which can leave
        the region of good prompts: main job, session 8, 39.7%, under zero-shot).

        With ``bounds`` every forward pass runs under those activation bounds (the deployed
        model), except the frozen encoder's features of a visual-prompt learner: its bounds
        cover the prompt tokens, which the frozen encoder lacks, so the zero-shot baseline
        is unclamped there. ``frozen_clean``: the frozen encoder's features of the clean test
        images under the same bounds (default: the cached unclamped ones).
        """
        trigger = self.attack.load_trigger()
        if trigger is None:
            return {"asr": None}
        if self.attack.honest_federation:  # nobody attacks the federation: the global prompt is the benign-only one
            self.shadow_arrays = {**get_arrays(self.model), **({"ctx": ctx.copy()} if self.model.learn_ctx else {})}
        idx = np.flatnonzero(self.test.labels != self.cfg.target_label) if full else self.asr_idx
        if full:
            self.final_trigger = {"state": trigger.state(), "sources": trigger_sources(self.attack.store, self.run_dir)}
        clean = self.images[idx]
        root = self.model.bound_root()
        with torch.no_grad():
            triggered = trigger(clean)
            with bounded(root, None if self.model.needs_images else bounds):
                frozen = self.clip.encode_images_batched(triggered)  # the frozen encoder: the zero-shot baseline's
            with bounded(root, bounds):
                feats = self.model.encode_images_batched(triggered) if self.model.learns_features else frozen
        dev = self.model.prompt_learner.ctx.device
        labels = self.test.labels[idx]
        target = self.cfg.target_label
        diff = (triggered - clean).flatten(1)
        base = self.features if clean_features is None else clean_features
        frozen_clean = self.features if frozen_clean is None else frozen_clean
        with torch.no_grad(), bounded(root, bounds):  # text-side bounds too, when bounds-layers names any
            text = self.model.text_features(torch.from_numpy(ctx).to(dev)).cpu()
            zero_shot = self.zero_shot_text().cpu()
            rates = target_rates(feats, base[idx], labels, target, {"global": text, "zero_shot": zero_shot})
            if self.model.learns_features:
                rates["asr_zero_shot"] = target_rates(frozen, frozen_clean[idx], labels, target, {"global": zero_shot})[
                    "asr_global"
                ]
            shadow_trig, shadow_clean = self.under_shadow(triggered, feats, base, frozen_clean)
            asr = attack_success_rate(predict(self.model, feats, torch.from_numpy(ctx).to(dev)), labels, target)
        return {
            "asr": asr,
            "trigger_only_asr": attack_success_rate(shadow_trig, labels, target),
            "trigger_zs_asr": rates["asr_zero_shot"],
            "shadow_clean_acc": accuracy(shadow_clean, self.labels),
            "clean_target_rate": rates["clean_target_rate"],
            "trigger_linf": float(diff.abs().max()),
            "trigger_l2": float(diff.norm(dim=1).mean()),
            "asr_n": len(idx),  # the ASR's denominator: non-target test images evaluated
        }

    def under_shadow(
        self, triggered: torch.Tensor, feats: torch.Tensor, base: torch.Tensor, frozen_clean: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Predictions of the benign-only shadow on the triggered images and on the clean test images.

        A text-only learner reuses the features (``feats``, ``base``) under the shadow's ``ctx``; a
        learner whose features depend on its weights recomputes both under the shadow's arrays (the
        model's arrays are restored afterwards).
        """
        dev = self.model.prompt_learner.ctx.device
        if not self.model.learns_features:
            shadow = torch.from_numpy(self.shadow_ctx).to(dev)
            return predict(self.model, feats, shadow), predict(self.model, base, shadow)
        current = get_arrays(self.model)
        set_arrays(self.model, self.shadow_arrays)
        try:
            with torch.no_grad():
                trig = self.model.encode_images_batched(triggered)
                clean = self.model.features(self.images, self.features if frozen_clean is None else frozen_clean)
            return predict(self.model, trig), predict(self.model, clean)
        finally:
            set_arrays(self.model, current)

    def bounded_metrics(self, ctx: np.ndarray, row: dict, server_round: int, full: bool) -> dict:
        """Clean accuracy and backdoor metrics with the activation bounds applied (the deployed model).

        ``clean_acc``/``asr`` (and the trigger metrics) become the bounded
        figures; the unbounded ones stay as ``clean_acc_nobounds``/``asr_nobounds``.
        """
        out = {"clean_acc_nobounds": row["clean_acc"], "asr_nobounds": row.get("asr")}
        with bounded(self.model.bound_root(), self.bounds):
            frozen = None if self.model.needs_images else self.clip.encode_images_batched(self.images)
            features = self.model.features(self.images, frozen)  # the learner's image path, clamped
            out["clean_acc"] = accuracy(predict(self.model, features), self.labels)
        out.update(
            self.backdoor_metrics(
                ctx, server_round, full=full, clean_features=features, bounds=self.bounds, frozen_clean=frozen
            )
        )
        return out

    def evaluate_round(self, server_round: int, arrays: dict[str, np.ndarray]) -> dict:
        """Evaluate the global learned ``arrays`` after ``server_round``; write the metrics row and checkpoint."""
        t_eval = time.perf_counter()
        set_arrays(self.model, arrays)
        ctx = get_ctx(self.model)  # the text context (fixed at its initialisation when only the image path learns)
        features = self.model.features(self.images, self.features)  # the cached ones unless the learner maps them
        clean = accuracy(predict(self.model, features), self.labels)
        final = server_round == self.cfg.num_server_rounds
        row: dict = {"round": server_round, "clean_acc": clean}
        learned_features = features if self.model.learns_features else None  # None: the cached frozen ones
        row.update(self.backdoor_metrics(ctx, server_round, full=final, clean_features=learned_features))
        if self.bounds is not None:
            row.update(self.bounded_metrics(ctx, row, server_round, final))
        if server_round == 0:
            row["zero_shot_acc"] = self.zero_shot_acc
        info, self.round_info = self.round_info, {}
        partitions = info.pop("partitions", {})
        flagged = info.pop("flagged", None)
        updates = info.pop("updates", {})
        if flagged is not None and partitions:
            rates = detection_rates(flagged, self.malicious, partitions.values())
            row.update({"det_tpr": rates["tpr"], "det_fpr": rates["fpr"], "flagged": sorted(flagged)})
        if updates and self.malicious:
            row.update(update_stealth(updates, self.malicious))
        row.update(info)
        now = time.perf_counter()
        row["eval_s"] = now - t_eval
        row["round_s"] = now - self.t_last
        row["elapsed_s"] = now - self.t_start
        self.t_last = now
        self.history.append(row)
        self.run_dir.append_metrics(row)
        bounds = {f"bounds:{k}": v for k, v in self.bounds.to_arrays().items()} if self.bounds is not None else {}
        shadow = {f"shadow_{k}": v for k, v in {**self.shadow_arrays, "ctx": self.shadow_ctx}.items()}
        self.run_dir.write_checkpoint(server_round, {**arrays, "ctx": ctx, **shadow, **bounds})
        asr = "-" if row["asr"] is None else f"{100 * row['asr']:.1f}%"
        log(
            INFO,
            "[fedsec] round %d/%d  clean_acc %.1f%%  asr %s  (%.1fs)",
            server_round,
            self.cfg.num_server_rounds,
            100 * row["clean_acc"],
            asr,
            row["round_s"],
        )
        return row

    def finish(self, arrays: dict[str, np.ndarray]) -> dict:
        """Write ``summary.json`` and the final prompt (every learned array); return the summary."""
        set_arrays(self.model, arrays)
        ctx = get_ctx(self.model)
        last = self.history[-1] if self.history else {}
        summary = {
            "clean_acc": last.get("clean_acc"),
            "asr": last.get("asr"),
            "zero_shot_acc": self.zero_shot_acc,
            "initial_acc": self.history[0]["clean_acc"] if self.history else None,
            "best_clean_acc": max((r["clean_acc"] for r in self.history), default=None),
            "rounds": self.cfg.num_server_rounds,
            "wall_s": time.perf_counter() - self.t_start,
            "attack": self.cfg.attack,
            "strategy": self.cfg.strategy,
            "malicious_partitions": self.malicious,
            "num_partitions": self.num_partitions,
        }
        for key in ("clean_acc_nobounds", "asr_nobounds"):
            if key in last:
                summary[key] = last[key]
        if self.bounds is not None:
            np.savez(self.run_dir.path / "final_bounds.npz", **self.bounds.to_arrays())
        last_value = ("trigger_only_asr", "shadow_clean_acc", "trigger_zs_asr", "clean_target_rate")
        for key in (*last_value, "det_tpr", "det_fpr"):
            vals = [r[key] for r in self.history if r.get(key) is not None]
            if vals:
                summary[key] = vals[-1] if key in last_value else float(np.mean(vals))
        self.run_dir.write_json("summary.json", summary)
        pl = self.model.prompt_learner
        identity = {
            **self.clip.identity(),
            "classnames": self.classnames,
            "n_ctx": pl.n_ctx,
            "ctx_init": pl.ctx_init,
            "class_token_position": pl.class_token_position,
            "class_specific": pl.class_specific,
            "prompt_layout": "[SOS] ctx_1..ctx_n <class name> . [EOS] (class-token-position moves the name)",
            "learner": self.cfg.learner,
            "learned_arrays": sorted(arrays),
            **learner_identity(self.model),
            "zero_shot_template": self.cfg.prompt_template,
            "dataset": self.cfg.dataset,
            "data_root": self.cfg.data_root,
            "eval_split": "test",
            "eval_size": len(self.test),
            "pixel_space": "[0,1] RGB at image_size; mean/std applied inside the model",
            "image_fit": self.test.fit,
        }
        self.run_dir.write_final_prompt(ctx, identity, **{k: v for k, v in arrays.items() if k != "ctx"})
        write_provenance(self)  # provenance.json, eval_subsets.npz, final_trigger.npz (docs/reevaluate.md)
        log(INFO, "[fedsec] results\n%s", format_table([summary]))
        return summary


def learner_identity(model) -> dict:
    """How a learner's image-path weights enter the model (``final_prompt.json``), or nothing for a text-only one."""
    out = {}
    vp, adapter = model.visual_prompt, model.feature_adapter
    if vp is not None:
        out["visual_prompt"] = {
            "array": "vpt (final_prompt.npz): depth x tokens x width",
            "tokens": vp.n_tokens,
            "depth": vp.depth,
            "where": "vpt[0] appended after the positional embedding, before ln_pre; vpt[i] replaces them at the "
            "input of block i (1 <= i < depth); dropped after the last block (fedsec.models.visual_prompt)",
        }
    if adapter is not None:
        out["feature_adapter"] = {
            "arrays": "adapter-down (width/r x width), adapter-up (width x width/r) in final_prompt.npz",
            "ratio": adapter.ratio,
            "where": "f' = normalize(ratio * relu(relu(f @ down.T) @ up.T) + (1 - ratio) * f) on the L2-normalised "
            "image feature f, before the cosine logits (fedsec.models.adapter)",
        }
    return out


def format_table(
    rows: list[dict], keys: tuple[str, ...] = ("attack", "strategy", "zero_shot_acc", "clean_acc", "asr", "wall_s")
) -> str:
    """A Markdown table of run summaries (percentages for accuracies)."""

    def cell(k: str, v) -> str:
        if v is None:
            return "-"
        if isinstance(v, str):
            return v
        if k.endswith(("acc", "asr", "tpr", "fpr", "rate")):
            return f"{100 * v:.1f}%"
        if isinstance(v, float):
            return f"{v:.1f}"
        return str(v)

    head = "| " + " | ".join(keys) + " |"
    sep = "|" + "|".join("---" for _ in keys) + "|"
    body = ["| " + " | ".join(cell(k, r.get(k)) for k in keys) + " |" for r in rows]
    return "\n".join([head, sep, *body])
