#!/usr/bin/env bash
# Create .venv (if needed) and install dali-lens with its tested torch/torchvision/DALI pins.
# Idempotent: a second run with unchanged pyproject.toml/constraints is a no-op.
set -euo pipefail
cd "$(dirname "$0")"
PY="${PYTHON:-python3}"
case "$(uname -m)" in
  aarch64|arm64) pins=constraints-aarch64.txt ;;
  *) pins=constraints.txt ;;
esac
stamp=.venv/.dali-lens-installed
want="$(cat pyproject.toml "$pins" | sha256sum | cut -c1-16)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && .venv/bin/python -c "import dali_lens, torchvision" 2>/dev/null; then
  exit 0
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
echo "setup: installing dali-lens and its dependencies into .venv (pins: $pins) ..." >&2
.venv/bin/python -m pip install -q --disable-pip-version-check -c "$pins" -e ".[dev]" 2>&1 \
  | grep -v -E "^WARNING: Location .* is ignored" >&2 || true
.venv/bin/python -c "import dali_lens, torch, torchvision" \
  || { echo "setup: installation failed (see the pip output above)" >&2; exit 1; }
echo "$want" > "$stamp"
