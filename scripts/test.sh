#!/usr/bin/env bash
# Install (idempotent) and run the test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"  # one ninja (the venv's) for DeepSpeed's JIT ops
.venv/bin/ruff check mimscale recipes tests benchmarks
exec .venv/bin/python -m pytest -q "$@"
