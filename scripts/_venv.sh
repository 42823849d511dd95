# Sourced by the other scripts: make sure .venv exists and holds this checkout with the given extras.
# Re-installs only when pyproject.toml changed since the last install, so repeated runs start fast.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${MACP_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"
extras="${1:-}"
if [ ! -x "$VENV/bin/python" ]; then
  echo "creating virtual environment in $VENV" >&2
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
fi
stamp="$VENV/.macp-install-${extras:-base}"
if [ ! -f "$stamp" ] || [ "$ROOT/pyproject.toml" -nt "$stamp" ]; then
  echo "installing macp-runtime${extras:+[$extras]} into $VENV" >&2
  # setuptools always adds an informational "Editable installation." notice (a meta path finder is how it
  # serves the package-dir mapping); it is not a problem, so it is filtered here. Real warnings still show.
  PYTHONWARNINGS="ignore:Editable installation:UserWarning" \
    "$VENV/bin/python" -m pip install --quiet -e "$ROOT${extras:+[$extras]}"
  touch "$stamp"
fi
