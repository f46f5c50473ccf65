#!/usr/bin/env bash
# Renew constraints.txt: resolve the project's dependencies afresh in a new virtual
# environment (newest releases that pyproject.toml admits), then pin exactly what was
# installed. Run it deliberately, then run the README's test command and commit both.
#   bash tools/renew_constraints.sh [python]      (default: python3)
set -euo pipefail
cd "$(dirname "$0")/.."
py=${1:-python3}
venv=$(mktemp -d)/venv
"$py" -m venv "$venv"
"$venv/bin/pip" install -q torch==2.13.0 -e ".[dev]"
{
  echo "# Exact versions the test suite was run with (renew: bash tools/renew_constraints.sh)."
  echo "# $("$venv/bin/python" -V), $(uname -m), $(date -u +%Y-%m-%d)."
  # torch's local label (+cpu, +cu130) names the build, not the release: pin the release
  "$venv/bin/pip" freeze --exclude-editable | sed -E 's/^(torch==[^+]+)\+.*/\1/'
} > constraints.txt
rm -rf "$(dirname "$venv")"
echo "wrote constraints.txt ($(grep -vc '^#' constraints.txt) packages)"
