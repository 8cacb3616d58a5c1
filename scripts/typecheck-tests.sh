#!/usr/bin/env bash
# mypy (strict, the settings in pyproject.toml) over the tests. Several test directories
# have their own conftest.py and import their helper modules by bare name, as pytest's
# rootdir-relative sys.path does; in one mypy run those would be duplicate modules, so
# this checks the top-level tests/*.py once and then each directory on its own, with
# tests/ and that directory as MYPYPATH (`stowaway` is found through mypy_path = src).
# MYPY names the mypy to run (default: the project's venv).
set -euo pipefail
cd "$(dirname "$0")/.."
MYPY="${MYPY:-.venv/bin/mypy}"
status=0
MYPYPATH=tests "$MYPY" tests/*.py || status=1
for dir in tests/*/; do
  compgen -G "$dir*.py" >/dev/null || continue
  MYPYPATH="tests:$dir" "$MYPY" "$dir" || status=1
done
exit "$status"
