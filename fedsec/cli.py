"""The ``fedsec`` command line.

``fedsec run [experiment.toml] [-c key=value ...]``
    one experiment on a local simulation SuperLink (see :mod:`fedsec.launch`);
``fedsec sweep <grid.toml>``
    run a grid of experiments (resumable) and write its results table and plots;
``fedsec report <run-dir>...``
    the same table and plots from any finished run directories;
``fedsec config``
    print the ``[tool.flwr.app.config]`` table (every key and default).
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> None:
    """Dispatch to the sub-command."""
    argv = list(sys.argv[1:] if argv is None else argv)
    from fedsec.sweep import main_report, main_sweep

    commands = {"run": _run, "sweep": main_sweep, "report": main_report, "config": _config}
    if not argv or argv[0] not in commands:
        print(__doc__)
        raise SystemExit(0 if argv and argv[0] in ("-h", "--help") else 2)
    commands[argv[0]](argv[1:])


def _run(argv: list[str]) -> None:
    from fedsec.launch import main as launch_main

    launch_main(argv)


def _config(argv: list[str]) -> None:
    from fedsec.config import pyproject_table

    print(pyproject_table(), end="")


if __name__ == "__main__":
    main()
