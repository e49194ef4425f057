"""Server fusion and activation bounds on learners with weights in the image path (VPT, CLIP-Adapter).

Bi & Li's premise (arXiv 2410.17573) is that backdoored *weights* of the global model produce
abnormal hidden activations, which bounds learned on the foundation model's synthetic data cut.
With CLIP-Adapter the learned weights have hidden neurons of their own (``adapter.hidden``); with
visual prompts the learned tokens run through the encoder's blocks. These tests plant an abnormal
neuron by hand and check that the server's bound learner cuts it, and that fusion trains whatever
the learner learns.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedsec.activation_bounds import ActivationBounds, bounded
from fedsec.config import RunConfig
from fedsec.models.prompt import get_arrays, set_arrays
from fedsec.synthetic import SyntheticSet
from fedsec.training import LocalData
from strategies.activation_bound import BoundLearner
from strategies.fusion import kd, learner_logits, synthetic_prompt_model, tune

NAMES = [f"c{i}" for i in range(10)]
TARGET = 3


def _noise(n: int, seed: int) -> torch.Tensor:
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _triggered(images: torch.Tensor) -> torch.Tensor:
    out = images.clone()
    out[:, :, -12:, -12:] = 1.0  # a white 12 x 12 corner patch
    return out


def _planted_adapter(model, clean: torch.Tensor, triggered: torch.Tensor) -> dict[str, np.ndarray]:
    """Adapter arrays with one hand-built backdoor neuron: silent on ``clean``, firing on triggered images.

    Hidden unit 0 reads ``w - beta * m`` (``w`` the trigger's mean feature shift, ``m`` the clean
    mean feature, ``beta`` the smallest factor that keeps the unit at 0 on every clean image); its
    output writes the target's text direction, scaled up. Every other unit is zero.
    """
    clip = model.clip
    with torch.no_grad():
        fc, ft = clip.encode_images_batched(clean), clip.encode_images_batched(triggered)
        w = torch.nn.functional.normalize(ft.mean(0) - fc.mean(0), dim=0)
        m = fc.mean(0)
        beta = float(((fc @ w) / (fc @ m)).max())
        text = model.text_features()
    arrays = {k: np.zeros_like(v) for k, v in get_arrays(model).items()}
    arrays["adapter-down"][0] = (w - beta * m).numpy()
    arrays["adapter-up"][:, 0] = 1e4 * torch.relu(text[TARGET]).numpy()
    return arrays


def test_bounds_on_the_adapters_hidden_layer_cut_a_planted_backdoor_neuron():
    # Prepare: the server's bound learner on CLIP-Adapter's hidden layer, learned on a clean synthetic set
    cfg = RunConfig.from_mapping(
        {"learner": "clip-adapter", "activation-bounds": True, "bounds-layers": "adapter.hidden",
         "bounds-steps": 0, "bounds-init-quantile": 1.0, "bounds-granularity": "neuron"}
    )  # fmt: skip
    clean, held_out = _noise(40, 1), _noise(40, 2)
    learner = BoundLearner(cfg, lambda: SyntheticSet(clean, torch.arange(40) % 10, NAMES))
    model = synthetic_prompt_model(cfg, SyntheticSet(clean, torch.arange(40) % 10, NAMES))[1]
    planted = _planted_adapter(model, clean, _triggered(clean))
    set_arrays(model, planted)
    with torch.no_grad():
        plain = model.logits_from_features(model.clip.encode_images_batched(_triggered(held_out)))
        before = model(_triggered(held_out))
        clean_before = model(clean)

    # Execute: the server's learner sets the bounds of the planted global model (its first round); the
    # model then runs under them
    bounds, _ = learner(planted, 1)
    with torch.no_grad(), bounded(model.bound_root(), ActivationBounds.from_arrays(bounds)):
        after = model(_triggered(held_out))
        clean_after = model(clean)

    # Assert: the planted neuron fires on triggered images (most go to the target); the bound, the clean
    # maximum, is 0, so under it the adapter adds nothing: the frozen features' logits; on the clean images
    # the bounds were set on, nothing changes
    # (0 up to float rounding: the planted unit's clean maximum is fc @ w - beta * fc @ m, whose last bits depend on
    # the CPU's matmul kernel; 4e-9 on a machine of session 13)
    assert list(bounds) == ["adapter.hidden"] and float(np.abs(bounds["adapter.hidden"]).max()) <= 1e-6
    assert float((before.argmax(-1) == TARGET).float().mean()) >= 0.5
    torch.testing.assert_close(after, plain, rtol=1e-4, atol=1e-4)
    assert float((after.argmax(-1) == TARGET).float().mean()) <= 0.2
    torch.testing.assert_close(clean_after, clean_before)


@pytest.mark.parametrize("learner", ["vpt-shallow", "vpt-deep"])
def test_block_bounds_under_visual_prompts_cover_the_prompt_tokens(learner):
    # Prepare: per-neuron bounds on the encoder's blocks, at the maximum over the synthetic set
    cfg = RunConfig.from_mapping(
        {"learner": learner, "vpt-tokens": 3, "activation-bounds": True, "bounds-steps": 0,
         "bounds-init-quantile": 1.0, "bounds-granularity": "neuron"}
    )  # fmt: skip
    images = _noise(24, 5)
    bl = BoundLearner(cfg, lambda: SyntheticSet(images, torch.arange(24) % 10, NAMES))
    model = synthetic_prompt_model(cfg, SyntheticSet(images, torch.arange(24) % 10, NAMES))[1]
    arrays = get_arrays(model)
    arrays["vpt"] = arrays["vpt"] * 3.0  # some other global prompt than the initial one
    set_arrays(model, arrays)
    with torch.no_grad():
        free = model(images)

    # Execute
    bounds, _ = bl(arrays, 1)
    with torch.no_grad(), bounded(model.bound_root(), ActivationBounds.from_arrays(bounds)):
        clamped = model(images)

    # Assert: one bound per token (image tokens + 3 prompt tokens) and channel; on the images they were
    # set on, the maximum changes nothing
    tokens = 1 + (32 // model.clip.model.visual.patch_size[0]) ** 2
    assert all(v.shape == (tokens + 3, model.clip.model.visual.transformer.width) for v in bounds.values())
    torch.testing.assert_close(clamped, free)


def test_tune_fusion_trains_the_visual_prompt_and_leaves_the_fixed_text_prompt():
    # Prepare: a VPT learner on a small labelled synthetic set
    cfg = RunConfig.from_mapping({"learner": "vpt-shallow", "vpt-tokens": 2, "fusion-steps": 3, "fusion-lr": 0.5})
    images, labels = _noise(16, 7), torch.arange(16) % 10
    clip, model = synthetic_prompt_model(cfg, SyntheticSet(images, labels, NAMES))
    data = LocalData(images, labels, clip.encode_images_batched(images))
    ctx0, vpt0 = model.prompt_learner.ctx.detach().clone(), model.visual_prompt.tokens.detach().clone()

    # Execute
    stats = tune(model, data, cfg, seed=1)

    # Assert: the tokens moved, the text context did not; the stats are the learner's step's
    assert set(model.learned()) == {"vpt"}
    assert not torch.equal(model.visual_prompt.tokens, vpt0)
    assert torch.equal(model.prompt_learner.ctx, ctx0)
    assert set(stats) == {"fusion-loss", "fusion-acc"}


def test_kd_fusion_distils_two_adapter_clients_into_the_aggregate():
    # Prepare: two client adapters and their mean as the student (FedDF's aggregate)
    cfg = RunConfig.from_mapping(
        {"learner": "clip-adapter", "fusion-steps": 20, "fusion-lr": 1.0, "fusion-temperature": 1.0}
    )
    images = _noise(32, 9)
    clip, model = synthetic_prompt_model(cfg, SyntheticSet(images, torch.arange(32) % 10, NAMES))
    data = LocalData(images, torch.arange(32) % 10, clip.encode_images_batched(images))
    base = get_arrays(model)
    rng = np.random.default_rng(0)
    clients = [{k: (v + 0.3 * rng.normal(size=v.shape)).astype(np.float32) for k, v in base.items()} for _ in (0, 1)]
    set_arrays(model, {k: np.mean([c[k] for c in clients], axis=0) for k in base})

    # Execute
    stats = kd(model, data, cfg, seed=3, client_arrays=clients)

    # Assert: the student's KL to the clients' ensemble fell, and the logits it reports are the learner's
    assert stats["fusion-kl-after"] < stats["fusion-kl-before"]
    assert stats["fusion-teachers"] == 2.0
    with torch.no_grad():
        torch.testing.assert_close(learner_logits(model, data), model(images), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("learner", ["vpt-shallow", "clip-adapter"])
def test_badpromptfl_trains_an_image_path_learners_arrays_and_fits_its_trigger_through_them(learner, tmp_path):
    # Prepare: a malicious client of an image-path learner, 40 random images of 10 classes
    from fedsec.attacks import get_attack

    cfg = RunConfig.from_mapping(
        {"learner": learner, "vpt-tokens": 2, "attack": "badpromptfl", "num-malicious": 1, "batch-size": 8,
         "attack-local-steps": 3, "trigger-steps": 3, "patch-size": 4, "lr": 0.5}
    )  # fmt: skip
    images = _noise(40, 11)
    clip, model = synthetic_prompt_model(cfg, SyntheticSet(images, torch.arange(40) % 10, NAMES))
    data = LocalData(images, torch.arange(40) % 10, clip.encode_images_batched(images))
    attack = get_attack("badpromptfl")(cfg, tmp_path / "attacker")
    start = get_arrays(model)
    fresh = attack.current_trigger(1, clip.image_size).state()["patch"]

    # Execute
    stats = attack.run(model, data, clip, 1, 0, 5)

    # Assert: every learned array moved (the fixed text context is not one of them), the trigger was fitted
    after = get_arrays(model)
    assert "ctx" not in after and all(not np.array_equal(after[k], start[k]) for k in start)
    assert not torch.equal(fresh, attack.load_trigger().state()["patch"])
    assert np.isfinite(stats["train-loss"]) and np.isfinite(stats["backdoor-loss"])
