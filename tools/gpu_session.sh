#!/usr/bin/env bash
# What we run on the lent H100 (the `device` tool), from the repo root, with `.whl` carried:
#   bash tools/gpu_session.sh tests      nsa suites (junit), GPU checks, bench_smoke --compile
#   bash tools/gpu_session.sh workflow   the default Snakemake workflow, report into $OUT
# Beforehand, here: bash ../shared/tools/gpu-wheels.sh .whl && git bundle create .whl/repo.bundle --all
# (the device's copy of the tree has no git history, and the workflow checks out commits).
set -uo pipefail
: "${OUT:?run this through the device tool, which sets OUT}"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site PATH=/tmp/site/bin:$PATH
# Keep /tmp/repo between calls on a warm machine, so an interrupted workflow run resumes.
if [ -d /tmp/repo/.git ]; then
  git -C /tmp/repo fetch -q "$PWD/.whl/repo.bundle" "+refs/heads/*:refs/heads/*" --update-head-ok || exit 1
else
  git clone -q .whl/repo.bundle /tmp/repo || exit 1
fi
cd /tmp/repo && git checkout -q -f "${GPU_SESSION_REF:-main}" || exit 1
export PYTHONPATH=/tmp/repo:/tmp/site
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
case "${1:-tests}" in
  tests)
    python3 -m pytest nsa/tests -q -rs -p no:cacheprovider --junitxml="$OUT/nsa-junit.xml" > "$OUT/pytest.log" 2>&1
    tail -n 25 "$OUT/pytest.log"
    python3 tools/gpu_checks.py > "$OUT/checks.log" 2>&1; grep -E "^(decode|flex|prefill)|Error" "$OUT/checks.log"
    python3 -m nsa.bench_smoke --compile --json "$OUT/bench.json" > "$OUT/bench.log" 2>&1
    sed -n '/^summary/,$p' "$OUT/bench.log"
    ;;
  workflow)
    # Stop short of the 10-minute call limit; a second call resumes (--rerun-incomplete via profile).
    timeout "${GPU_SESSION_LIMIT:-560}" snakemake --cores 1 all > "$OUT/snakemake.log" 2>&1
    echo "snakemake rc=$?"
    tail -n 30 "$OUT/snakemake.log"
    cp results/report.html results/report.md results/summary.json "$OUT/" 2>/dev/null
    ;;
esac
