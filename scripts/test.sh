#!/usr/bin/env bash
# One command for the tests: install with dev tools, then lint, type-check and run pytest.
# PostgreSQL tests skip (with the reason) when no server answers on 127.0.0.1:5432.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh --dev
.venv/bin/ruff check src tests bench
.venv/bin/mypy
exec .venv/bin/pytest -ra "$@"
