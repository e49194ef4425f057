#!/usr/bin/env bash
# Set up everything fedsec needs on a fresh machine (idempotent, offline apart from
# package registries): Debian's Fashion-MNIST, a venv with the pinned torch, fedsec itself.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  echo "[setup] installing dataset-fashion-mnist (Debian)"
  SUDO=""; [ "$(id -u)" != 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv"
  "$PY" -m venv .venv
fi
stamp=".venv/.fedsec-$(sha256sum pyproject.toml | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  if ! .venv/bin/python -c "import torch, torchvision" 2>/dev/null; then
    echo "[setup] installing torch 2.14.1 / torchvision 0.29.1 (local wheels)"
    .venv/bin/pip install -q --disable-pip-version-check torch==2.14.1 torchvision==0.29.1
  fi
  echo "[setup] installing fedsec and its dependencies"
  .venv/bin/pip install -q --disable-pip-version-check -e ".[dev]"
  rm -f .venv/.fedsec-*
  touch "$stamp"
fi
