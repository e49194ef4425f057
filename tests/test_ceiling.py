"""The ceiling-analysis grid (experiments/ceiling.py): cells, their no-attack twins and commands."""

from __future__ import annotations

import pytest

from experiments.ceiling import cell_config, command, load_cells, partial_table, runs_from_log
from tests.conftest import ROOT


def test_shipped_grid_cells_resolve_to_valid_configs():
    # Prepare
    base, cells = load_cells(ROOT / "experiments" / "grids" / "ceiling.toml")
    # Execute
    configs = {c["name"]: cell_config(base, c) for c in cells}
    # Assert: the central cell is one malicious client holding the whole pool; dilution cells differ only in
    # the number of attackers
    cfg, clients = configs["central"]
    assert clients == 1 and cfg.num_malicious == 1 and cfg.k_shot == 160 and cfg.attack == "badpromptfl"
    assert [configs[f"{m}-of-10"][0].num_malicious for m in (1, 2, 3)] == [1, 2, 3]
    assert configs["2-of-10-reoptimised"][0].get("trigger-rounds") == 0
    assert all(not c.class_specific for n, (c, _) in configs.items() if n != "2-of-10-csc")


def test_no_attack_twin_keeps_everything_but_the_attack():
    # Prepare
    base = {"attack": "badpromptfl", "num-server-rounds": 7, "seed": 3}
    cell = {"name": "x", "clients": 10, "num-malicious": 2, "patch-size": 4}
    # Execute
    attacked, _ = cell_config(base, cell)
    benign, clients = cell_config(base, cell, attack=False)
    # Assert
    assert clients == 10 and benign.attack == "none" and benign.num_malicious == 0
    assert benign.num_server_rounds == attacked.num_server_rounds == 7 and benign.seed == attacked.seed == 3
    # the attack's own keys are reset, so cells differing only in them share one reference run
    assert attacked.get("patch-size") == 4 and benign.get("patch-size") == 8
    other, _ = cell_config(base, {**cell, "patch-size": 12, "stealth-weight": 0.0}, attack=False)
    assert other.to_dict() == benign.to_dict()


def test_cut_off_logs_give_the_rounds_they_reached(tmp_path):
    # Prepare: a no-attack run of 3 rounds, then an attacked run cut off after 2
    log = "\n".join(
        [
            "round 1: clean_acc 40.0%  asr -",
            "round 2: clean_acc 50.0%  asr -",
            "round 3: clean_acc 60.0%  asr -",
            "  malicious 3: local clean_acc 1.0%  local asr 2.0%  {}",
            "round 1: clean_acc 35.0%  asr 10.0%",
            "round 2: clean_acc 45.5%  asr 90.0%",
        ]
    )
    (tmp_path / "cell.txt").write_text(log)
    # Execute
    runs = runs_from_log(log)
    table = partial_table(tmp_path)
    # Assert
    assert runs == [[(0.4, None), (0.5, None), (0.6, None)], [(0.35, 0.1), (0.455, 0.9)]]
    assert "| cell | 2 | - | - | 90.0% | 10.0% | 45.5% | 50.0% | -4.5 |" in table


def test_cut_off_logs_pair_an_attack_from_a_late_round_with_a_separate_twin_log(tmp_path):
    # Prepare: an attacked run whose attack starts in round 2 (ASR "-" before), cut off after 3 rounds,
    # and the no-attack twin in twin-seed1.txt, as a --twins-only process writes it
    (tmp_path / "pool-seed1.txt").write_text(
        "round 1: clean_acc 30.0%  asr -\nround 2: clean_acc 40.0%  asr 20.0%\nround 3: clean_acc 41.0%  asr 80.0%\n"
    )
    (tmp_path / "twin-seed1.txt").write_text(
        "round 1: clean_acc 30.0%  asr -\nround 2: clean_acc 42.0%  asr -\nround 3: clean_acc 44.0%  asr -\n"
    )
    # Execute
    table = partial_table(tmp_path)
    # Assert: two attacked rounds seen, the gap read against the twin's round 3; the twin log gets no row
    assert "| pool-seed1 | 2 | - | - | 80.0% | 20.0% | 41.0% | 44.0% | -3.0 |" in table
    assert "| twin-seed1 |" not in table


def test_command_reproduces_the_cell_and_bad_cells_are_named(tmp_path):
    # Prepare / Execute
    cmd = command({"model": "fedsec-tiny-clip-v2"}, {"name": "c", "clients": 4, "class-specific": False})
    bad = tmp_path / "bad.toml"
    bad.write_text('[[cell]]\nname = "no-clients"\n')
    # Assert
    assert cmd.startswith("python experiments/inprocess_fl.py --num-clients 4 -c ")
    assert 'model="fedsec-tiny-clip-v2"' in cmd and "class-specific=false" in cmd
    with pytest.raises(SystemExit, match="needs name and clients"):
        load_cells(bad)


def test_cell_artifacts_hold_both_prompts_and_the_attackers_state(tmp_path):
    # Prepare
    import numpy as np

    from experiments.ceiling import save_artifacts

    store = tmp_path / "store"
    for rnd in (1, 2):
        (store / "attacker" / f"round_000{rnd}").mkdir(parents=True)
        (store / "attacker" / f"round_000{rnd}" / "p3.pt").write_bytes(b"trigger %d" % rnd)
    ctx, benign = np.arange(8.0).reshape(2, 4), -np.ones((2, 4))
    # Execute
    (tmp_path / "out").mkdir()
    save_artifacts(tmp_path / "out", "cell", ctx, benign, store)
    # Assert: the final and the no-attack prompts round-trip; the attackers' last-round files are copied
    saved = np.load(tmp_path / "out" / "cell.npz")
    np.testing.assert_array_equal(saved["ctx"], ctx)
    np.testing.assert_array_equal(saved["benign_ctx"], benign)
    assert [p.name for p in (tmp_path / "out" / "cell.attacker").iterdir()] == ["round_0002"]
    assert (tmp_path / "out" / "cell.attacker" / "round_0002" / "p3.pt").read_bytes() == b"trigger 2"


def test_twin_cache_round_trips_and_keys_on_the_whole_config(tmp_path, monkeypatch):
    # Prepare: a stand-in checkpoint hash (no model load)
    import numpy as np

    import experiments.ceiling as ceiling

    monkeypatch.setattr(ceiling, "clip_for", lambda cfg: type("C", (), {"checkpoint_sha256": "ab" * 32})())
    twins = ceiling.TwinCache(tmp_path / "twins")
    cfg, clients = ceiling.cell_config({"seed": 1}, {"name": "x", "clients": 10}, attack=False)
    other, _ = ceiling.cell_config({"seed": 2}, {"name": "x", "clients": 10}, attack=False)
    # Execute
    twins.put(cfg, clients, np.ones((1, 4)), 0.5)
    # Assert: the same config and client count hit; another seed or client count misses
    hit = twins.get(cfg, clients)
    assert hit is not None and hit["acc"] == 0.5 and hit["ctx"].shape == (1, 4)
    assert twins.get(other, clients) is None and twins.get(cfg, 9) is None


def _twin_with_edited_key(tmp_path, monkeypatch, edit) -> tuple:
    """A stored twin of seed 1 (stand-in checkpoint hash) whose stored config key ``edit`` changed in place."""
    import json

    import numpy as np

    import experiments.ceiling as ceiling

    monkeypatch.setattr(ceiling, "clip_for", lambda cfg: type("C", (), {"checkpoint_sha256": "ab" * 32})())
    twins = ceiling.TwinCache(tmp_path / "twins")
    cfg, clients = ceiling.cell_config({"seed": 1}, {"name": "x", "clients": 10}, attack=False)
    twins.put(cfg, clients, np.ones((1, 4)), 0.5)
    path = next((tmp_path / "twins").glob("*.npz"))
    with np.load(path) as z:
        key = json.loads(str(z["key"]))
    edit(key)
    np.savez(path, ctx=np.ones((1, 4)), acc=np.float64(0.5), key=json.dumps(key))
    return twins, cfg, clients


def test_twin_cache_survives_new_keys_at_their_defaults(tmp_path, monkeypatch):
    # Prepare: a twin stored before a key existed (simulated by dropping a key from the stored config)
    import experiments.ceiling as ceiling

    twins, cfg, clients = _twin_with_edited_key(tmp_path, monkeypatch, lambda key: key.pop("k-shot"))
    changed, _ = ceiling.cell_config({"seed": 1, "k-shot": 8}, {"name": "x", "clients": 10}, attack=False)
    # Execute / Assert: the missing key at its default still hits; a non-default value misses
    assert twins.get(cfg, clients) is not None
    assert twins.get(changed, clients) is None


def test_twin_cache_ignores_attack_keys_whose_defaults_changed(tmp_path, monkeypatch):
    # Prepare: a twin stored when BadPromptFL's defaults were the joint design (attack keys reset to them)
    joint = {"attack-mode": "joint", "backdoor-weight": 2.0, "attack-lr": 0.005}
    twins, cfg, clients = _twin_with_edited_key(tmp_path, monkeypatch, lambda key: key.update(joint))
    # Execute / Assert: today's twin config still hits it
    assert twins.get(cfg, clients) is not None
