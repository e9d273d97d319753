#!/usr/bin/env bash
# What a new user sees: a fresh clone of HEAD and a fresh virtual environment, then the README's two commands
# (install from the lock file, run the tests), repeated under the oneDNN code paths the numeric tests must survive.
#   bash scripts/fresh_check.sh [RUNS] [ISA ...]     e.g.  bash scripts/fresh_check.sh 3 native AVX2
# ISA 'native' leaves ONEDNN_MAX_CPU_ISA unset (native bf16 where the CPU has it); any other value is exported as
# ONEDNN_MAX_CPU_ISA (AVX2: bf16 emulated). Prints one line per run; logs stay under $FRESH_DIR (default /tmp/fresh).
set -uo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
runs=${1:-3}; shift || true
if [ $# -gt 0 ]; then isas=("$@"); else isas=(native AVX2); fi
out=${FRESH_DIR:-/tmp/fresh}; mkdir -p "$out"
commit=$(git -C "$repo" rev-parse --short HEAD)
echo "fresh_check: commit $commit, CPU $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores, $runs run(s) x ${isas[*]}"
for i in $(seq 1 "$runs"); do
    for isa in "${isas[@]}"; do
        dir=$(mktemp -d "$out/run-$isa-$i-XXXX")
        git clone -q "$repo" "$dir/repo" && cd "$dir/repo" || exit 1
        python -m venv "$dir/venv" && source "$dir/venv/bin/activate"
        if [ "$isa" = native ]; then unset ONEDNN_MAX_CPU_ISA; else export ONEDNN_MAX_CPU_ISA=$isa; fi
        t0=$(date +%s)
        pip install -q -c constraints.txt torch==2.14.1 torchvision==0.29.1 > "$dir/install.log" 2>&1 &&
            pip install -q -c constraints.txt -e '.[test]' >> "$dir/install.log" 2>&1
        rc_install=$?; t1=$(date +%s)
        python -m pytest -q > "$dir/pytest.log" 2>&1; rc=$?; t2=$(date +%s)
        deactivate; cd "$out"
        echo "run $i isa=$isa install rc=$rc_install $((t1 - t0)) s | pytest rc=$rc $((t2 - t1)) s | $(tail -n 1 "$dir/pytest.log") | $dir"
        [ "$rc" -eq 0 ] && rm -rf "$dir/venv" "$dir/repo"
    done
done
