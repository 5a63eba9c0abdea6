#!/usr/bin/env bash
# Run etrnd for real, with no ISP and no root: a toy ETRN server on 127.0.0.1 and
# `etrnd run` watching the loopback interface. Needs python3 (with venv) only.
# Arguments go to `python -m etrnd.demo`, e.g. scripts/demo.sh --seconds 5
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
if ! .venv/bin/python -c 'import etrnd, pyroute2, aiosmtplib' 2>/dev/null; then
    .venv/bin/python -m pip install -q --disable-pip-version-check -e .
fi
exec .venv/bin/python -m etrnd.demo "$@"
