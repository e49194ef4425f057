"""The ``fedsec`` command line.

``fedsec run [experiment.toml] [-c key=value ...]``
    one experiment on a local simulation SuperLink (see :mod:`fedsec.launch`);
``fedsec sweep <grid.toml>``
    run a grid of experiments (resumable) and write its results table and plots;
``fedsec report <run-dir>...``
    the same table and plots from any finished run directories;
``fedsec deploy {all,superlink,supernodes,register,run} ...``
    run on a Flower deployment (SuperLink + SuperNodes, TLS and node
    authentication; see :mod:`fedsec.deploy` and ``docs/deployment.md``);
``fedsec config [--write | --markdown]``
    print the ``[tool.flwr.app.config]`` table (every key and default, core,
    attack and strategy parameters); ``--write`` puts it into ./pyproject.toml;
    ``--markdown`` prints the reference of every key (docs/config-reference.md).
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> None:
    """Dispatch to the sub-command."""
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"run": _run, "sweep": _sweep, "report": _report, "deploy": _deploy, "config": _config}
    if not argv or argv[0] not in commands:
        print(__doc__)
        raise SystemExit(0 if argv and argv[0] in ("-h", "--help") else 2)
    commands[argv[0]](argv[1:])


def _run(argv: list[str]) -> None:
    from fedsec.launch import main as launch_main

    launch_main(argv)


def _sweep(argv: list[str]) -> None:
    from fedsec.sweep import main_sweep  # imports torch: only for the commands that need it

    main_sweep(argv)


def _deploy(argv: list[str]) -> None:
    from fedsec.deploy import main as deploy_main

    raise SystemExit(deploy_main(argv))


def _report(argv: list[str]) -> None:
    from fedsec.sweep import main_report

    main_report(argv)


def _config(argv: list[str]) -> None:
    from pathlib import Path

    from fedsec.config import config_reference_markdown, pyproject_table

    if "--markdown" in argv:
        print(config_reference_markdown(), end="")
        return
    if "--write" not in argv:
        print(pyproject_table(), end="")
        return
    path = Path("pyproject.toml")
    head = "[tool.flwr.app.config]\n"
    if not path.exists() or head not in path.read_text():
        print(
            f"fedsec config --write: {path.resolve()} is not the fedsec app's pyproject.toml (no {head.strip()}); "
            "run it in the fedsec checkout, or use `fedsec config` to print the table",
            file=sys.stderr,
        )
        raise SystemExit(2)
    table = pyproject_table()
    text = path.read_text()
    start = text.index(head) + len(head)
    end = text.find("\n[", start)
    path.write_text(text[:start] + table + (text[end:] if end != -1 else ""))
    print(f"updated {path}")


if __name__ == "__main__":
    main()
