#!/usr/bin/env bash
# bench/gpu.py on a lent GPU machine, which reaches no registry and lacks pydantic (the one
# package model/ needs beyond its image: torch 2.11, numpy, pyarrow, safetensors on Python 3.12).
#
#   bash bench/gpu_machine.sh fetch        # here: pydantic and the dependencies its metadata names,
#                                          # Python 3.12 / manylinux x86-64 wheels, into bench/wheels/
#   bash bench/gpu_machine.sh run [ARGS]   # there: install them into a folder on PYTHONPATH, then
#                                          # python3 bench/gpu.py --out $OUT/bench-gpu.jsonl ARGS
#
# The device tool: command "bash bench/gpu_machine.sh run", carry ["bench/wheels"], timeout_s 450.
# The wheels (about 3 MB) are git-ignored. typing-extensions travels too: the image's may be older
# than pydantic needs, and a newer one on PYTHONPATH serves torch as well.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=bench/wheels
SITE=${GPTFLOW_SITE:-/tmp/gptflow-site}

case "${1:-}" in
fetch)
    python3 -m pip download --quiet --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --dest "$WHEELS" "pydantic>=2"
    ls "$WHEELS"
    ;;
run)
    shift
    python3 -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$SITE" "$WHEELS"/*.whl
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
    exec python3 bench/gpu.py --out "${OUT:-.}/bench-gpu.jsonl" "$@"
    ;;
*)
    echo "usage: bash bench/gpu_machine.sh fetch | run [bench/gpu.py arguments]" >&2
    exit 2
    ;;
esac
