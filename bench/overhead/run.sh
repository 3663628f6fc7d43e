#!/usr/bin/env bash
# Aiguillage overhead benchmark: one command.
#
#   bash bench/overhead/run.sh                 # full run: direct, nginx, aiguillage, litellm
#   bash bench/overhead/run.sh --quick         # 3 s per step, no report update (harness check)
#   bash bench/overhead/run.sh --targets direct,nginx,litellm --duration 5 ...
#
# Every other argument goes to bench/overhead/bench.py (see --help there).  It installs
# what is missing (Debian: nginx, wrk; PyPI: LiteLLM into bench/.venvs/litellm, py-spy
# into .venv), builds the load generator, then runs bench.py, which starts and stops
# every server itself.  Traffic goes to 127.0.0.1 only.  Writes bench/RESULTS.md (the
# section between the overhead markers) and bench/out/overhead-<date>/.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
cd "$REPO"

LITELLM_SPEC="litellm[proxy]==1.106.2"
PY="$REPO/.venv/bin/python"

log() { printf '[overhead] %s\n' "$*" >&2; }

# ---------------------------------------------------------------- prerequisites
need_apt=()
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || need_apt+=(nginx)
command -v wrk >/dev/null 2>&1 || need_apt+=(wrk)
command -v taskset >/dev/null 2>&1 || need_apt+=(util-linux)
command -v cc >/dev/null 2>&1 || need_apt+=(gcc libc6-dev)
if [ ${#need_apt[@]} -gt 0 ]; then
    log "installing from Debian: ${need_apt[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi
export PATH="$PATH:/usr/sbin"

if [ ! -x "$PY" ]; then
    log "no project venv at .venv: create it first (pip install -e .)"; exit 2
fi
if [ ! -x "$REPO/.venv/bin/py-spy" ]; then
    log "installing py-spy into .venv"
    "$PY" -m pip install -q py-spy
fi
if [ ! -x "$REPO/bench/.venvs/litellm/bin/litellm" ]; then
    log "installing $LITELLM_SPEC into bench/.venvs/litellm (a few minutes)"
    mkdir -p "$REPO/bench/.venvs"
    python3 -m venv "$REPO/bench/.venvs/litellm"
    "$REPO/bench/.venvs/litellm/bin/pip" install -q --upgrade pip
    "$REPO/bench/.venvs/litellm/bin/pip" install -q "$LITELLM_SPEC"
fi

mkdir -p "$REPO/bench/out"
if [ ! -x "$REPO/bench/out/loadgen" ] || [ "$HERE/loadgen.c" -nt "$REPO/bench/out/loadgen" ]; then
    log "building bench/out/loadgen"
    cc -O2 -Wall -o "$REPO/bench/out/loadgen" "$HERE/loadgen.c" -lm
fi

# ---------------------------------------------------------------- run
args=()
quick=0
for a in "$@"; do
    if [ "$a" = "--quick" ]; then quick=1; else args+=("$a"); fi
done
if [ $quick = 1 ]; then
    args=(--duration 3 --warmup 1 --max-duration 3 --no-write "${args[@]}")
fi

child=""
cleanup() {
    # bench.py ends its own servers; this is for an interrupted run
    if [ -n "$child" ] && kill -0 "$child" 2>/dev/null; then
        kill -TERM "$child" 2>/dev/null || true
        wait "$child" 2>/dev/null || true
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

cmdline="bash bench/overhead/run.sh${*:+ $*}"
"$PY" "$HERE/bench.py" --command "$cmdline" "${args[@]}" &
child=$!
wait "$child"
