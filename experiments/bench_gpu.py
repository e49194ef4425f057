"""GPU benchmark: a real-size CLIP (open_clip ViT-B/16 at 224 px, random weights) in fedsec's client work.

Random weights have the same compute as the real ones, so no download is
needed. Measured, in one process unless stated:

1. ``coop_step_ms``: a benign CoOp step on cached image features
   (:func:`fedsec.training.train_on_features`, batch ``--batch-size``);
2. ``badpromptfl_step_ms``: a BadPromptFL step (:class:`fedsec.attacks.badpromptfl.BadPromptFL`,
   joint trigger + prompt: the trigger's gradient flows through the image encoder);
3. ``encode_images_per_s``: frozen image-feature encoding throughput (no gradient,
   fp32 as fedsec runs it, and under bf16 autocast for reference);
4. a federated round of ``--clients`` clients, each encoding its ``--shots`` x classes
   images and running ``--local-steps`` CoOp steps, (a) in a Flower simulation
   (``flwr.simulation.run_simulation``, Ray backend) with ``client_resources.num_gpus`` in
   ``--gpu-fractions``, and (b) the same work in an in-process loop on the same device.
   The steady round time is the median over rounds 2..N (round 1 pays the actors'
   imports and model builds); the ratio is Flower / in-process.

Without a GPU the same code runs at small sizes (``--small``: ``fedsec-tiny-clip`` at
32 px, 2 clients, 2 rounds, CPU-only actors) so CI keeps it alive; the result file
then says it was not measured on a GPU. Writes ``--out`` (JSON) and a Markdown table
beside it.

Run: ``.venv/bin/python experiments/bench_gpu.py`` (on a GPU machine) or
``.venv/bin/python experiments/bench_gpu.py --small --out /tmp/bench_gpu.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from fedsec.attacks import ATTACKS  # noqa: E402
from fedsec.attacks.badpromptfl import BadPromptFL  # noqa: E402
from fedsec.config import RunConfig  # noqa: E402
from fedsec.models.factory import FrozenCLIP, create_clip  # noqa: E402
from fedsec.models.prompt import PromptCLIP, prompt_model  # noqa: E402
from fedsec.training import LocalData, train_on_features  # noqa: E402

CLASSNAMES = [f"class {i}" for i in range(1000)]
#: What a bench client is told through the environment (Ray actors inherit it).
ENV_SPEC = "FEDSEC_BENCH_GPU_SPEC"
ENV_LOG = "FEDSEC_BENCH_GPU_LOG"


# ----------------------------------------------------------------------------- shared work
def sync(device: str) -> None:
    """Wait for queued GPU work so wall-clock timers measure it."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@lru_cache(maxsize=1)
def built(model: str, classes: int, n_ctx: int, device: str) -> tuple[FrozenCLIP, PromptCLIP]:
    """The frozen CLIP (random weights) and a CoOp prompt model, once per process."""
    torch.manual_seed(0)
    clip = create_clip(model, "none", device)
    return clip, prompt_model(clip, CLASSNAMES[:classes], n_ctx, "", "end", False, seed=0)


def client_images(spec: dict, partition: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A client's seeded random images in ``[0, 1]`` and labels (``shots`` per class)."""
    g = torch.Generator().manual_seed(1000 + partition)
    n = spec["shots"] * spec["classes"]
    images = torch.rand(n, 3, spec["image_size"], spec["image_size"], generator=g)
    labels = torch.arange(spec["classes"]).repeat_interleave(spec["shots"])
    return images, labels


def client_work(spec: dict, partition: int, ctx: np.ndarray, server_round: int) -> tuple[np.ndarray, float]:
    """One client's round: encode its images, then ``local-steps`` CoOp steps from ``ctx``.

    The image features are re-encoded every round, as a client whose image path
    is not cached (a deployment message, a learner with image-path weights) must.
    """
    clip, model = built(spec["model"], spec["classes"], spec["n_ctx"], spec["device"])
    images, labels = client_images(spec, partition)
    t0 = time.perf_counter()
    features = clip.encode_images_batched(images, spec["encode_batch"])
    with torch.no_grad():
        model.prompt_learner.ctx.copy_(torch.from_numpy(ctx))
    train_on_features(
        model,
        features,
        labels,
        spec["local_steps"],
        spec["batch_size"],
        0.002,
        0.9,
        seed=server_round * 1000 + partition,
    )
    sync(spec["device"])
    return model.prompt_learner.ctx.detach().cpu().numpy().copy(), time.perf_counter() - t0


def initial_ctx(spec: dict) -> np.ndarray:
    """The seeded initial context (random init, shared context)."""
    width = built(spec["model"], spec["classes"], spec["n_ctx"], spec["device"])[1].prompt_learner.ctx.shape[-1]
    return (np.random.default_rng(0).standard_normal((spec["n_ctx"], width)) * 0.02).astype(np.float32)


# ----------------------------------------------------------------------------- 1-3: steps and encoding
def median_ms(fn, repeats: int, device: str) -> float:
    """Median wall time of ``fn()`` in milliseconds after one warm-up call."""
    fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def bench_steps(spec: dict, steps: int, repeats: int) -> dict:
    """CoOp step, BadPromptFL step and encoding throughput."""
    dev = spec["device"]
    clip, model = built(spec["model"], spec["classes"], spec["n_ctx"], dev)
    images, labels = client_images(spec, 0)
    features = clip.encode_images_batched(images, spec["encode_batch"])
    data = LocalData(images, labels, features)
    out: dict[str, float] = {}
    out["coop_step_ms"] = (
        median_ms(
            lambda: train_on_features(model, features, labels, steps, spec["batch_size"], 0.002, 0.9), repeats, dev
        )
        / steps
    )
    with tempfile.TemporaryDirectory() as store:
        extra = {p.key: p.default for p in (*ATTACKS.common, *ATTACKS.component("badpromptfl").params)}
        extra.update({"attack-local-steps": steps, "trigger-rounds": 0, "patch-size": max(2, spec["image_size"] // 4)})
        cfg = RunConfig(attack="badpromptfl", num_malicious=1, batch_size=spec["batch_size"], extra=extra)
        attack = BadPromptFL(cfg, Path(store))
        attack.partition_id = 0
        out["badpromptfl_step_ms"] = (
            median_ms(lambda: attack.local_train(model, data, clip, 1, 0), repeats, dev) / steps
        )
    big = torch.rand(spec["encode_images"], 3, spec["image_size"], spec["image_size"])
    ms = median_ms(lambda: clip.encode_images_batched(big, spec["encode_batch"]), repeats, dev)
    out["encode_images_per_s"] = spec["encode_images"] / (ms / 1000)
    if dev.startswith("cuda"):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            ms = median_ms(lambda: clip.encode_images_batched(big, spec["encode_batch"]), repeats, dev)
        out["encode_images_per_s_bf16_autocast"] = spec["encode_images"] / (ms / 1000)
    out["coop_over_badpromptfl"] = out["coop_step_ms"] / out["badpromptfl_step_ms"]
    return out


# ----------------------------------------------------------------------------- 4a: in-process loop
def inprocess_rounds(spec: dict, rounds: int) -> list[float]:
    """Round wall times of the same client work, clients one after the other, FedAvg of ``ctx``."""
    ctx = initial_ctx(spec)
    times = []
    for r in range(1, rounds + 1):
        t0 = time.perf_counter()
        updates = [client_work(spec, p, ctx, r)[0] for p in range(spec["clients"])]
        ctx = np.mean(updates, axis=0).astype(np.float32)
        times.append(time.perf_counter() - t0)
    return times


# ----------------------------------------------------------------------------- 4b: Flower simulation
def _flower_apps():
    """A ClientApp doing :func:`client_work` and a ServerApp running Flower's FedAvg on ``ctx``."""
    from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg

    client_app = ClientApp()

    @client_app.train()
    def train(msg: Message, context: Context) -> Message:
        spec = json.loads(os.environ[ENV_SPEC])
        partition = int(context.node_config["partition-id"])
        ctx = msg.content["arrays"]["ctx"].numpy()
        new, seconds = client_work(spec, partition, ctx, int(msg.content["config"]["server-round"]))
        content = RecordDict(
            {
                "arrays": ArrayRecord({"ctx": Array(new)}),
                "metrics": MetricRecord({"num-examples": spec["shots"] * spec["classes"], "work-s": seconds}),
            }
        )
        return Message(content, reply_to=msg)

    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        spec = json.loads(os.environ[ENV_SPEC])
        stamps: list[float] = []

        def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
            stamps.append(time.perf_counter())
            return MetricRecord({"round": server_round})

        strategy = FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=spec["clients"])
        strategy.start(
            grid=grid,
            initial_arrays=ArrayRecord({"ctx": Array(initial_ctx_small(spec))}),
            num_rounds=spec["rounds"],
            evaluate_fn=evaluate,
        )
        Path(os.environ[ENV_LOG]).write_text(json.dumps([b - a for a, b in zip(stamps, stamps[1:], strict=False)]))

    return server_app, client_app


def initial_ctx_small(spec: dict) -> np.ndarray:
    """:func:`initial_ctx` without building the model in the ServerApp (width from the spec)."""
    return (np.random.default_rng(0).standard_normal((spec["n_ctx"], spec["ctx_width"])) * 0.02).astype(np.float32)


def flower_rounds(spec: dict, rounds: int, num_gpus: float, num_cpus: int) -> list[float]:
    """Round wall times of a Flower simulation of the same work (fresh Ray runtime per call)."""
    from flwr.simulation import run_simulation

    # Build the apps from the importable module, not ``__main__``: Ray then pickles the
    # functions by reference, and each actor keeps one model in the module's cache.
    from experiments import bench_gpu

    server_app, client_app = bench_gpu._flower_apps()
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT), *[p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]]
    )
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "rounds.json"
        os.environ[ENV_SPEC] = json.dumps({**spec, "rounds": rounds})
        os.environ[ENV_LOG] = str(log)
        resources: dict[str, float] = {"num_cpus": num_cpus}
        if num_gpus > 0:
            resources["num_gpus"] = num_gpus
        run_simulation(
            server_app=server_app,
            client_app=client_app,
            num_supernodes=spec["clients"],
            backend_config={"client_resources": resources, "init_args": {"log_to_driver": True}},
        )
        if not log.exists():
            raise RuntimeError("the simulation ended without reporting its rounds (see the Flower log above)")
        return json.loads(log.read_text())


# ----------------------------------------------------------------------------- driver
def steady(times: list[float]) -> float:
    """Median round time without the first (warm-up) round."""
    rest = times[1:] or times
    return statistics.median(rest)


def device_facts(device: str) -> dict:
    """The card (or CPU) the numbers were measured on."""
    facts = {"device": device, "torch": torch.__version__, "python": platform.python_version()}
    if device.startswith("cuda"):
        p = torch.cuda.get_device_properties(0)
        facts.update(
            {
                "gpu": torch.cuda.get_device_name(0),
                "gpu_memory_gib": round(p.total_memory / 2**30, 1),
                "multiprocessors": p.multi_processor_count,
                "cuda": torch.version.cuda,
            }
        )
    else:
        facts["cpu_threads"] = torch.get_num_threads()
    facts["cpus"] = os.cpu_count()
    return facts


def markdown(res: dict) -> str:
    """The result as a Markdown report."""
    s, d = res["steps"], res["device"]
    coop, bad = s.get("coop_step_ms", float("nan")), s.get("badpromptfl_step_ms", float("nan"))
    lines = [
        f"# GPU benchmark ({res['spec']['model']}, {res['spec']['image_size']} px, random weights)",
        "",
        res["note"],
        "",
        f"Device: {d.get('gpu', 'CPU')} ({d['device']}, torch {d['torch']}); command: `{res['command']}`",
        "",
        "| step | ms |",
        "|---|---|",
        f"| benign CoOp step (cached features, batch {res['spec']['batch_size']}) | {coop:.2f} |",
        f"| BadPromptFL step (trigger + prompt through the image encoder) | {bad:.2f} |",
        "",
        f"Image encoding: {s.get('encode_images_per_s', float('nan')):.0f} images/s (fp32)"
        + (
            f", {s['encode_images_per_s_bf16_autocast']:.0f} images/s (bf16 autocast)"
            if "encode_images_per_s_bf16_autocast" in s
            else ""
        ),
        "",
        f"| {res['spec']['clients']}-client round | steady round (s) | ratio Flower / in-process |",
        "|---|---|---|",
        f"| in-process loop | {res['inprocess']['steady_round_s']:.3f} | 1.00 |",
    ]
    for row in res["flower"]:
        if "error" in row:
            lines.append(f"| Flower, num_gpus={row['num_gpus']} | failed: {row['error']} | - |")
        else:
            lines.append(
                f"| Flower, num_gpus={row['num_gpus']} ({row['actors']} actors) | {row['steady_round_s']:.3f} | "
                f"{row['ratio_to_inprocess']:.2f} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="CPU-size run (fedsec-tiny-clip, 2 clients, 2 rounds)")
    ap.add_argument("--model", default=None, help="open_clip model name (default ViT-B-16; --small: fedsec-tiny-clip)")
    ap.add_argument("--clients", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--shots", type=int, default=16, help="images per class per client")
    ap.add_argument("--local-steps", type=int, default=25)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=None, help="steps per timed repeat of the step benchmarks")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--encode-images", type=int, default=None, help="images in the encoding benchmark")
    ap.add_argument("--gpu-fractions", default="1,0.5,0.25", help="client_resources.num_gpus values (GPU only)")
    ap.add_argument("--skip-flower", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "experiments" / "results" / "bench_gpu.json"))
    args = ap.parse_args()

    device = "cuda" if torch.cuda.is_available() and not args.small else "cpu"
    small = args.small or device == "cpu"
    if device == "cpu":
        torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    spec = {
        "model": args.model or ("fedsec-tiny-clip" if small else "ViT-B-16"),
        "classes": args.classes,
        "shots": args.shots if not small else min(args.shots, 4),
        "n_ctx": 4,
        "local_steps": args.local_steps if not small else min(args.local_steps, 5),
        "batch_size": args.batch_size,
        "encode_batch": 256,
        "encode_images": args.encode_images or (64 if small else 2048),
        "clients": args.clients or (2 if small else 10),
        "device": device,
    }
    clip, model = built(spec["model"], spec["classes"], spec["n_ctx"], device)
    spec["image_size"] = clip.image_size
    spec["ctx_width"] = int(model.prompt_learner.ctx.shape[-1])
    rounds = args.rounds or (2 if small else 4)
    res: dict = {
        "spec": spec,
        "rounds": rounds,
        "command": " ".join(["python", "experiments/bench_gpu.py", *sys.argv[1:]]),
        "device": device_facts(device),
        "measured_on_gpu": device.startswith("cuda"),
        "note": (
            f"Measured on a GPU: {torch.cuda.get_device_name(0)}."
            if device.startswith("cuda")
            else "Not measured on a GPU: this is the CPU-size run (small model, few clients) that keeps the code alive."
        ),
        "params_million": round(sum(p.numel() for p in clip.model.parameters()) / 1e6, 1),
    }
    t0 = time.perf_counter()
    res["steps"] = bench_steps(spec, args.steps or (3 if small else 10), args.repeats or (2 if small else 5))
    print(json.dumps(res["steps"], indent=2), flush=True)
    ip = inprocess_rounds(spec, rounds)
    res["inprocess"] = {"round_s": ip, "steady_round_s": steady(ip)}
    print("in-process rounds:", ip, flush=True)
    res["flower"] = []
    if not args.skip_flower:
        fractions = [float(f) for f in args.gpu_fractions.split(",")] if device.startswith("cuda") else [0.0]
        cpus = os.cpu_count() or 1
        for frac in fractions:
            actors = min(cpus, int(1 / frac)) if frac > 0 else cpus
            row: dict = {"num_gpus": frac, "num_cpus": 1, "actors": min(actors, spec["clients"])}
            try:
                times = flower_rounds(spec, rounds, frac, 1)
                row.update(
                    {
                        "round_s": times,
                        "steady_round_s": steady(times),
                        "ratio_to_inprocess": steady(times) / res["inprocess"]["steady_round_s"],
                    }
                )
            except Exception as exc:  # keep the rest of the result: a failed row says why
                traceback.print_exc()
                row["error"] = f"{type(exc).__name__}: {exc}"[:300]
            res["flower"].append(row)
            print("flower:", row, flush=True)
    res["wall_s"] = time.perf_counter() - t0
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(res))
    print(markdown(res))


if __name__ == "__main__":
    main()
