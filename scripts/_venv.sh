# Sourced by scripts/test and scripts/quickstart: make .venv (if missing) and install narun into it.
# Usage: . scripts/_venv.sh EXTRAS   (EXTRAS like "dev" or "" for none)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
py="$venv/bin/python"
stamp="$venv/.narun-installed-${1:-base}"
# Reinstall only when pyproject.toml changed since the last install (editable install covers code).
if [ ! -f "$stamp" ] || [ "$root/pyproject.toml" -nt "$stamp" ]; then
    "$py" -m pip install -q --upgrade pip
    spec="$root"
    [ -n "${1:-}" ] && spec="$root[$1]"
    "$py" -m pip install -q -e "$spec"
    touch "$stamp"
fi
