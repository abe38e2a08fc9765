#!/usr/bin/env bash
# Sets up everything the project needs on a Debian/Ubuntu machine, idempotently:
#   - a virtual environment in .venv with the pinned requirements and this package;
#   - the real Fashion-MNIST (Debian's dataset-fashion-mnist) when it is missing and
#     apt is usable (root, or passwordless sudo). Without it, use the `digits` config.
# Re-running it is cheap: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
if ! .venv/bin/python -m pip install -q --disable-pip-version-check -r requirements.txt -e . ; then
  echo "setup: pip install failed; see the messages above" >&2
  exit 1
fi

FMNIST=/usr/share/datasets/fashion-mnist
if [ ! -e "$FMNIST/train-images-idx3-ubyte.gz" ] && command -v apt-get >/dev/null; then
  SUDO=""
  if [ "$(id -u)" != 0 ]; then
    if command -v sudo >/dev/null && sudo -n true 2>/dev/null; then SUDO="sudo -n"; else SUDO=none; fi
  fi
  if [ "$SUDO" != none ]; then
    echo "setup: installing Debian's dataset-fashion-mnist (real Fashion-MNIST IDX files)"
    { $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq dataset-fashion-mnist; } \
      >/dev/null 2>&1 || echo "setup: could not install dataset-fashion-mnist; Fashion-MNIST runs need --config.data_dir" >&2
  else
    echo "setup: apt needs root; Fashion-MNIST is missing (sudo apt-get install dataset-fashion-mnist)" >&2
  fi
fi
