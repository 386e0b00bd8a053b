#!/usr/bin/env bash
# Installs the dense-task stack (mmcv 2.1.0 with ops, mmengine, mmdet 3.3, mmseg 1.2) into the
# current Python; mmcv is built once from the PyPI sdist and its wheel cached outside the repo.
# Usage: scripts/install_openmmlab.sh [PYTHON]   (default: $PYTHON or `python`)
# Env: METAZOO_CACHE (default ~/.cache/metazoo), MAX_JOBS (default: number of cores).
set -euo pipefail

PY="${1:-${PYTHON:-python}}"
MMCV_VERSION=2.1.0
CACHE="${METAZOO_CACHE:-$HOME/.cache/metazoo}"
WHEELS="$CACHE/wheels"
PIP=("$PY" -m pip install --disable-pip-version-check -q)

log() { echo "[install_openmmlab] $*"; }

# Already complete? (idempotent fast path)
if "$PY" - <<'PY' 2>/dev/null; then
import importlib.metadata as md
assert md.version("mmcv") == "2.1.0"
import mmcv.ops, mmdet, mmseg, pycocotools, ftfy, regex  # noqa: F401  (mmcv.ops needs the compiled _ext)
PY
  log "mmcv $MMCV_VERSION with ops, mmdet and mmseg already installed"
  exit 0
fi

# The mmcv build needs pkg_resources (setuptools < 81) and torch 2.14 needs setuptools >= 77.0.3.
"${PIP[@]}" "setuptools>=77.0.3,<81" wheel ninja

PYTAG=$("$PY" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
TORCHTAG=$("$PY" -c 'import torch; print(torch.__version__.split("+")[0])')
mkdir -p "$WHEELS"
# Cache key: Python tag + torch version (the wheel links against this torch's C++ ABI).
WHEEL_DIR="$WHEELS/mmcv-$MMCV_VERSION-$PYTAG-torch$TORCHTAG"
WHEEL=$(ls "$WHEEL_DIR"/mmcv-"$MMCV_VERSION"-*.whl 2>/dev/null | head -n1 || true)

if [[ -z "$WHEEL" ]]; then
  log "building mmcv $MMCV_VERSION with ops (about 25 min on 2 cores); wheel -> $WHEEL_DIR"
  BUILD=$(mktemp -d)
  trap 'rm -rf "$BUILD"' EXIT
  "$PY" -m pip download --disable-pip-version-check -q --no-deps --no-binary :all: --no-build-isolation \
    "mmcv==$MMCV_VERSION" -d "$BUILD"
  tar -xzf "$BUILD"/mmcv-"$MMCV_VERSION".tar.gz -C "$BUILD"
  SRC="$BUILD/mmcv-$MMCV_VERSION"
  # torch 2.14's ATen headers require C++20; mmcv 2.1.0 hard-codes C++17.
  grep -q -- '-std=c++17' "$SRC/setup.py" || { log "setup.py has no -std=c++17 flag"; exit 1; }
  sed -i 's/-std=c++17/-std=c++20/g' "$SRC/setup.py"
  start=$(date +%s)
  MMCV_WITH_OPS=1 MAX_JOBS="${MAX_JOBS:-$(nproc)}" \
    "$PY" -m pip wheel --disable-pip-version-check --no-build-isolation --no-deps \
    -w "$BUILD/dist" "$SRC"
  log "mmcv build took $(( $(date +%s) - start )) s"
  mkdir -p "$WHEEL_DIR"
  built=$(ls "$BUILD"/dist/mmcv-"$MMCV_VERSION"-*.whl)
  # Atomic publish into the cache: copy to a temp name, then rename.
  cp "$built" "$WHEEL_DIR/.tmp.$$" && mv "$WHEEL_DIR/.tmp.$$" "$WHEEL_DIR/$(basename "$built")"
  WHEEL="$WHEEL_DIR/$(basename "$built")"
else
  log "reusing cached wheel $WHEEL"
fi

# mmcv's install deps (mmengine, addict, yapf, opencv...) come from PyPI; no openmim (it
# downgrades setuptools, requests and urllib3).
"${PIP[@]}" "$WHEEL"
"${PIP[@]}" "mmengine>=0.10,<0.11" "mmdet==3.3.0" "mmsegmentation==1.2.2" ftfy regex pycocotools
"$PY" -c 'import mmcv.ops, mmdet.models, mmseg.models; print("[install_openmmlab] ok: mmcv", __import__("mmcv").__version__)'
