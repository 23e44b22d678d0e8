#!/usr/bin/env bash
# What we run on the lent GPU (the `device` tool: an H100 or an H200), from the repo root, with `.whl` carried:
#   bash tools/gpu_session.sh tests      nsa suites (junit), GPU checks, bench_smoke --compile
#   bash tools/gpu_session.sh check      the harness's CUDA paths (tools/gpu_harness_check.py)
#   bash tools/gpu_session.sh kernels    the Triton kernels' and the training window route's GPU tests (values and
#                                        gradients, memory growth in T), then nsa.bench_prefill at 64K and 128K:
#                                        NSA default routes, with RoPE and the combine as eager ops, dense (own memory)
#   bash tools/gpu_session.sh workflow   the default Snakemake workflow, report and GPU memory per second into $OUT
#   bash tools/gpu_session.sh vibe       configs/nsa-vibe.yaml against .whl/vibe.bundle
#   bash tools/gpu_session.sh gputests   every gpu- or ops-marked test, failures named, junit
#   bash tools/gpu_session.sh long       nsa.bench_prefill (8K-64K; fla-core from .whl/fla when there),
#                                        nsa.bench_kernels (GPU_SESSION_KERNELS_S=0: not)
#   bash tools/gpu_session.sh decode     fused-decode GPU tests, then nsa.bench_smoke decode at 2K and 64K
#                                        context, B=1 and 8, eager / graph / compiled+graph, NSA vs dense
#   bash tools/gpu_session.sh profile    tools/gpu_profile.py: the layer's kernels in one forward and one forward +
#                                        backward at 64K (GPU_SESSION_T), top 40 by CUDA time; other runs
#                                        by GPU_SESSION_PROFILE, e.g. "decode 2048 1;decode 65536 8"
#   bash tools/gpu_session.sh sweep      tools/tile_sweep.py: the Triton kernels' launch options timed
#                                        against the library's choice at 64K (GPU_SESSION_SWEEP_ONLY: families;
#                                        GPU_SESSION_SWEEP_CANDIDATES: name prefixes, e.g. "fwd dq")
# GPU_SESSION_REF: the branch, tag or commit to run (default main); its files then go to $OUT/<ref>/.
# Beforehand, here: bash ../shared/tools/gpu-wheels.sh .whl && git bundle create .whl/repo.bundle --all
# (the device's copy of the tree has no git history, and the workflow checks out commits); for
# vibe also the wheels of nsa-vibe's dependencies (hydra-core, omegaconf, antlr4-python3-runtime)
# and `git -C <nsa-vibe clone> bundle create .whl/vibe.bundle --all`.
set -uo pipefail
: "${OUT:?run this through the device tool, which sets OUT}"
export PYTHONUNBUFFERED=1
# (a warm machine's second call: pip warns about every existing target directory; keep that off the tail)
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>"$OUT/pip.log" \
  || { cat "$OUT/pip.log"; exit 1; }
export PYTHONPATH=/tmp/site PATH=/tmp/site/bin:$PATH
# Keep /tmp/repo between calls on a warm machine, so an interrupted workflow run resumes.
if [ -d /tmp/repo/.git ]; then
  git -C /tmp/repo fetch -q "$PWD/.whl/repo.bundle" "+refs/heads/*:refs/heads/*" --update-head-ok || exit 1
else
  git clone -q .whl/repo.bundle /tmp/repo || exit 1
fi
cd /tmp/repo && git checkout -q -f "${GPU_SESSION_REF:-main}" || exit 1
# A named ref writes under $OUT/<ref>/, so two refs timed in one call keep both logs.
if [ -n "${GPU_SESSION_REF:-}" ]; then OUT="$OUT/$(printf %s "$GPU_SESSION_REF" | tr -c 'A-Za-z0-9._-' '_')"; mkdir -p "$OUT"; fi
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
  gputests)
    # Every GPU- or ops-marked test (Triton kernels, flex, FA-2, decode), failures named.
    timeout "${GPU_SESSION_TESTS_S:-540}" python3 -m pytest nsa/tests -q -rfs -p no:cacheprovider -m "gpu or ops" \
      --junitxml="$OUT/gpu-junit.xml" > "$OUT/gpu-pytest.log" 2>&1; grep -E "^(FAILED|ERROR)" "$OUT/gpu-pytest.log"
    tail -n 3 "$OUT/gpu-pytest.log"
    ;;
  long)
    [ -d "$OLDPWD/.whl/fla" ] && python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$OLDPWD"/.whl/fla/*.whl
    # GPU_SESSION_PREFILL_ONLY: variants to time (nsa.bench_prefill --only), e.g. "nsa_layer dense_sdpa" at 128K.
    timeout "${GPU_SESSION_PREFILL_S:-330}" python3 -m nsa.bench_prefill --lengths ${GPU_SESSION_LENGTHS:-8192 16384 32768 65536} \
      --reps 3 ${GPU_SESSION_PREFILL_ONLY:+--only $GPU_SESSION_PREFILL_ONLY} --json "$OUT/prefill.json" > "$OUT/prefill.log" 2>&1
    cat "$OUT/prefill.log"
    if [ "${GPU_SESSION_KERNELS_S:-200}" -gt 0 ]; then
      timeout "${GPU_SESSION_KERNELS_S:-200}" python3 -m nsa.bench_kernels --budget-s "$(( ${GPU_SESSION_KERNELS_S:-200} - 20 ))" \
        --json "$OUT/bench_kernels.json" > "$OUT/bench_kernels.log" 2>&1; sed -n '/^branch /,$p' "$OUT/bench_kernels.log" | tail -n 40
    fi
    ;;
  profile)
    # GPU_SESSION_PROFILE: gpu_profile.py's arguments per run, runs separated by ';' (e.g. "decode 2048 1").
    IFS=';' read -r -a runs <<< "${GPU_SESSION_PROFILE:-prefill ${GPU_SESSION_T:-65536};train ${GPU_SESSION_T:-65536}}"
    for r in "${runs[@]}"; do
      log="$OUT/profile-$(echo $r | tr ' ' '-').log"
      timeout 200 python3 tools/gpu_profile.py $r > "$log" 2>&1
      grep -v "^USDT" "$log" | head -n 50
    done
    ;;
  sweep)
    timeout "${GPU_SESSION_SWEEP_S:-540}" python3 tools/tile_sweep.py --budget-s "$(( ${GPU_SESSION_SWEEP_S:-540} - 120 ))" \
      --only ${GPU_SESSION_SWEEP_ONLY:-compressed scoring selection window} \
      ${GPU_SESSION_SWEEP_CANDIDATES:+--candidates $GPU_SESSION_SWEEP_CANDIDATES} --json "$OUT/sweep.json" > "$OUT/sweep.log" 2>&1
    cat "$OUT/sweep.log"
    ;;
  decode)
    timeout 150 python3 -m pytest nsa/tests/test_triton_decode.py -q -rfs -p no:cacheprovider > "$OUT/decode-pytest.log" 2>&1
    tail -n 8 "$OUT/decode-pytest.log"
    timeout "${GPU_SESSION_DECODE_S:-400}" python3 -m nsa.bench_smoke --skip-prefill --compile --contexts 2048,65536 \
      --batches 1,8 --steps 100 --json "$OUT/decode_long.json" > "$OUT/decode_long.log" 2>&1
    sed -n '/^routes/p;/^summary/,$p' "$OUT/decode_long.log"
    ;;
  kernels)
    timeout "${GPU_SESSION_TESTS_S:-240}" python3 -m pytest nsa/tests/test_triton_attention.py nsa/tests/test_triton_selection.py \
      nsa/tests/test_triton_scoring.py nsa/tests/test_triton_elementwise.py nsa/tests/test_gpu_kernels.py \
      nsa/tests/test_long_context.py -q -rfs \
      -p no:cacheprovider -m "gpu or ops" --junitxml="$OUT/kernels-junit.xml" > "$OUT/kernels-pytest.log" 2>&1
    grep -E "^(FAILED|ERROR|E  )" "$OUT/kernels-pytest.log" | head -n 30; tail -n 2 "$OUT/kernels-pytest.log"
    timeout "${GPU_SESSION_PREFILL_S:-300}" python3 -m nsa.bench_prefill --lengths 65536 131072 --reps 3 \
      --only nsa_layer nsa_layer_eager_elementwise dense_sdpa --json "$OUT/prefill.json" > "$OUT/prefill.log" 2>&1
    grep -v "first timed call" "$OUT/prefill.log"
    ;;
  check)
    for a in "--adapter nsa" "--dense"; do python3 tools/gpu_harness_check.py $a 2>&1 | tail -n 8 || exit 1; done
    ;;
  workflow|vibe)
    # GPU_SESSION_CONFIGFILE (absolute path): merged over the others, e.g. smaller sizes to fit a call;
    # GPU_SESSION_TARGET: the snakemake target (default all), e.g. results/train/train.json.
    files=(${GPU_SESSION_CONFIGFILE:-})
    extra=()
    if [ "$1" = vibe ]; then
      [ -d /tmp/vibe/.git ] || git clone -q "$OLDPWD/.whl/vibe.bundle" /tmp/vibe || exit 1
      mkdir -p /tmp/vibe-work && cp config.yaml /tmp/vibe-work/ && cd /tmp/vibe-work || exit 1
      files=(/tmp/repo/configs/nsa-vibe.yaml "${files[@]}")
      extra=(--snakefile /tmp/repo/Snakefile --config repo=/tmp/vibe)
    fi
    [ ${#files[@]} -gt 0 ] && extra+=(--configfile "${files[@]}")
    # Stop short of the 10-minute call limit; a second call resumes (--rerun-incomplete via profile).
    start=$(date +%s)
    # GPU memory every second while it runs: the benchmark generations' footprint (issue 7's OOM).
    nvidia-smi --query-gpu=timestamp,memory.used --format=csv,noheader,nounits -l 1 > "$OUT/gpumem-$1.log" 2>&1 &
    smi=$!
    timeout "${GPU_SESSION_LIMIT:-560}" snakemake --cores 1 ${GPU_SESSION_TARGET:-all} "${extra[@]}" > "$OUT/snakemake-$1.log" 2>&1
    echo "snakemake rc=$? after $(( $(date +%s) - start )) s"
    kill "$smi" 2>/dev/null
    sort -t, -k2 -n "$OUT/gpumem-$1.log" | tail -n 1 | sed 's/^/largest GPU memory reading (MiB): /'
    grep -E "Error|error" "$OUT/snakemake-$1.log" | tail -n 10
    python3 /tmp/repo/tools/job_times.py "$OUT/snakemake-$1.log"   # seconds per rule: where the time went
    for f in report.html report.md summary.json; do cp "results/$f" "$OUT/$1-$f" 2>/dev/null; done
    # Everything but environments and checkouts (junit files carry per-test times), and the log.
    tar czf "$OUT/$1-results.tgz" --exclude=results/env --exclude=results/envs --exclude=results/checkouts --exclude=results/repos results
    ;;
esac
