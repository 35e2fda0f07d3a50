#!/usr/bin/env bash
# Sets up mugs-fast on a fresh Debian/Ubuntu machine (root or sudo): the system packages that ffcv's
# build needs, then a virtual environment holding the package and its dependencies from PyPI, at the versions
# the test suite passed on (requirements/*.txt, pip constraints).
#   bash install.sh                        # the package, in .venv (requirements/tested.txt)
#   bash install.sh --dev                  # the package and the test tools (pytest, ruff)
#   bash install.sh --dev --gpu-machine    # in .venv-gpu-machine: the GPU check machine's torch 2.11 / triton 3.6
#                                          # (requirements/gpu-machine.txt), to meet those versions here first
set -euo pipefail
cd "$(dirname "$0")"

extras="" venv=".venv" lock="requirements/tested.txt"
for arg in "$@"; do
  case "$arg" in
    --dev) extras="[dev]" ;;
    --gpu-machine) venv=".venv-gpu-machine" lock="requirements/gpu-machine.txt" ;;
    *) echo "usage: bash install.sh [--dev] [--gpu-machine]" >&2; exit 2 ;;
  esac
done

# A new environment takes ~7 GB (torch's CUDA build and the NVIDIA libraries it loads), plus pip's downloads while it
# installs: with less free room, stop now with the numbers, not midway on "No space left on device".
need_gb=10
if [[ ! -x "$venv/bin/python" ]]; then
  read -r free_kb mount < <(df -Pk . | awk 'NR == 2 {print $4, $6}')
  if (( free_kb < need_gb * 1024 * 1024 )); then
    echo "install.sh: $venv needs about $need_gb GB of free disk, and $mount has $((free_kb / 1024 / 1024)) GB free:" \
      "free some room (or clone mugs-fast onto a larger disk), then run it again" >&2
    exit 1
  fi
fi

sudo=""
[[ $(id -u) -ne 0 ]] && sudo="sudo"
pkgs=(g++ pkg-config libturbojpeg0-dev libopencv-dev)
python3 -c "import ensurepip, venv" 2>/dev/null || pkgs+=(python3-venv python3-dev)
if ! dpkg -s "${pkgs[@]}" >/dev/null 2>&1; then
  echo "== apt: ${pkgs[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${pkgs[@]}" >/dev/null
fi

[[ -x "$venv/bin/python" ]] || python3 -m venv "$venv"
echo "== pip: mugs-fast${extras} into $venv, versions from $lock (first time: ~7 GB, a few minutes)"
"$venv/bin/python" -m pip install -q -U pip
"$venv/bin/python" -m pip install -q -c "$lock" -e ".${extras}"
"$venv/bin/python" -c "import torch, triton, timm, nvidia.dali, ffcv; print('== ready: torch', torch.__version__, \
'| triton', triton.__version__, '| timm', timm.__version__, '| CUDA available:', torch.cuda.is_available())"
