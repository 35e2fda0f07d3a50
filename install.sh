#!/usr/bin/env bash
# Sets up mugs-fast on a fresh Debian/Ubuntu machine (root or sudo): the system packages that ffcv's
# build needs, then a virtual environment in .venv holding the package and its dependencies from PyPI.
#   bash install.sh          # the package
#   bash install.sh --dev    # the package and the test tools (pytest, ruff)
set -euo pipefail
cd "$(dirname "$0")"

extras=""
case "${1:-}" in
  "") ;;
  --dev) extras="[dev]" ;;
  *) echo "usage: bash install.sh [--dev]" >&2; exit 2 ;;
esac

sudo=""
[[ $(id -u) -ne 0 ]] && sudo="sudo"
pkgs=(g++ pkg-config libturbojpeg0-dev libopencv-dev)
python3 -c "import ensurepip, venv" 2>/dev/null || pkgs+=(python3-venv python3-dev)
if ! dpkg -s "${pkgs[@]}" >/dev/null 2>&1; then
  echo "== apt: ${pkgs[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${pkgs[@]}" >/dev/null
fi

[[ -x .venv/bin/python ]] || python3 -m venv .venv
echo "== pip: mugs-fast${extras} into .venv (first time: ~6 GB, a few minutes)"
.venv/bin/python -m pip install -q -U pip
.venv/bin/python -m pip install -q -e ".${extras}"
.venv/bin/python -c "import torch, timm, nvidia.dali, ffcv; print('== ready: torch', torch.__version__, '| CUDA available:', torch.cuda.is_available())"
