"""Kept for old commands: the deployment launcher is ``fedsec deploy`` (:mod:`fedsec.deploy`)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from fedsec.deploy import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
