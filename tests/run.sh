#!/usr/bin/env bash
# The whole test suite, as a user runs it from a fresh clone: the system packages it needs,
# a virtualenv with mtlsproxy installed as a user installs it (not editable, so the twistd
# drop-in is tested the way it ships), then ruff, mypy and pytest. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/system-deps.sh
VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip
"$VENV/bin/python" -m pip install -q --disable-pip-version-check ".[test]"
"$VENV/bin/ruff" check mtlsproxy tests examples twisted
"$VENV/bin/mypy"
exec "$VENV/bin/pytest" "$@"
