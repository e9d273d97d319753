#!/usr/bin/env bash
# Regenerate constraints.txt, the project's lock file: every run and test dependency at the version a fresh virtual
# environment gets today. Run it on purpose (to take new releases), review the diff, run the tests, commit both.
#   bash scripts/lock.sh            # writes constraints.txt at the repository root
set -euo pipefail
cd "$(dirname "$0")/.."
venv=$(mktemp -d)/venv
trap 'rm -rf "$(dirname "$venv")"' EXIT
python -m venv "$venv"
export PIP_DISABLE_PIP_VERSION_CHECK=1
"$venv/bin/pip" install -q torch==2.14.1 torchvision==0.29.1       # the CPU machines' local wheels (see README)
"$venv/bin/pip" install -q -e '.[test]'
{
    echo "# Lock file for the run and test dependencies (pip constraints), made by scripts/lock.sh on $(date -u +%F)"
    echo "# with $("$venv/bin/python" --version) on $(uname -m). Used by the README's install commands and .ci/run."
    # --all keeps setuptools (the `test` extra: tests/test_packaging.py builds the wheel without build isolation)
    "$venv/bin/pip" freeze --all --exclude pip --exclude-editable | LC_ALL=C sort -f
} > constraints.txt
echo "constraints.txt: $(grep -vc '^#' constraints.txt) pinned packages"
