"""The launcher's results table (fedsec.evaluation.format_table)."""

from __future__ import annotations

from fedsec.evaluation import format_table


def test_rates_and_accuracies_print_as_percent_other_floats_plain():
    # Prepare
    row = {"attack": "badpromptfl", "clean_acc": 0.611, "asr": 0.2373, "clean_target_rate": 0.0934, "wall_s": 176.04}
    # Execute
    table = format_table([row], ("attack", "clean_acc", "asr", "clean_target_rate", "wall_s", "missing"))
    # Assert
    assert table.splitlines()[-1] == "| badpromptfl | 61.1% | 23.7% | 9.3% | 176.0 | - |"


def test_sweep_cells_give_rates_in_percent_with_their_spread():
    # Prepare
    from fedsec.sweep import _pm

    row = {"seeds": 3, "clean_target_rate": 0.0934, "clean_target_rate_std": 0.012, "wall_s": 10.0, "wall_s_std": 1.0}
    # Execute / Assert
    assert _pm(row, "clean_target_rate") == "9.3% ± 1.2"
    assert _pm(row, "wall_s") == "10.0 ± 1.0"
