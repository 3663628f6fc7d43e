#!/usr/bin/env bash
# One command for the embedded default: install, start llama.cpp engines with SmolLM2,
# create a demo key and serve the gateway on http://127.0.0.1:8000 (Ctrl-C stops all).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh
exec .venv/bin/aiguillage demo "$@"
