#!/usr/bin/env bash
# The GPU check: one call on a GPU machine, under 8 minutes in all (issue #12, part 3).
#
#   bench/gpu/stage.sh                  # here, first: stages .whl/ (Ray, DeepSpeed, pydantic...)
#   bash bench/gpu/check.sh             # there, carrying .whl (the device tool: carry [".whl"])
#
# It installs the staged wheels into $SITE (the machine has torch and transformers but no
# Ray, DeepSpeed or pydantic, and no package registry), uses orch from the checkout, prints
# the versions and nvidia-smi, then runs `pytest -m gpu tests/test_gpu.py` and
# bench/gpu_throughput.py, each under its own timeout so that one hang leaves time for the
# other: PYTEST_TIMEOUT (180 s) and BENCH_TIMEOUT (240 s), after ~25 s of installing, keep
# the call under 8 minutes. Run it with the device tool's timeout_s=540.
# Results go to $OUT (the device tool's folder that comes back), else bench/results/:
#   log                 everything printed
#   pytest_gpu.xml      the tests' JUnit report
#   gpu_throughput.json the figures (also written to bench/results/)
# The exit status is the first failing part's (0 when all passed).
set -uo pipefail # not -e: a failing part must not skip the next one
cd "$(dirname "$0")/../.."

OUT=${OUT:-bench/results}
PY=${ORCH_GPU_PYTHON:-python3}
SITE=${ORCH_SITE:-/tmp/site}
PYTEST_TIMEOUT=${PYTEST_TIMEOUT:-180}
BENCH_TIMEOUT=${BENCH_TIMEOUT:-240}
BENCH_ARGS=${BENCH_ARGS:-}
mkdir -p "$OUT"
touch "$OUT/log.start" # what this run writes is newer
exec > >(tee -a "$OUT/log") 2>&1
export PYTHONUNBUFFERED=1
status=0
started=$SECONDS

part() { echo; echo "=== $* ($((SECONDS - started)) s)"; }
failed() { echo "!!! $1 failed: exit $2"; [ "$status" -ne 0 ] || status=$2; }
# After a part was killed at its timeout (124, or 137 from `timeout -k`), stop the Ray it left
# running, so that the next part starts on a free GPU. Only then: `ray stop` stops every Ray
# of the machine, and where this is rehearsed others may be running theirs.
stop_leftover_ray() { case $1 in 124 | 137) ray stop --force >/dev/null 2>&1 || true ;; esac; }

part "install the staged wheels into $SITE"
# --no-deps: the staged set names each missing requirement; the rest is the machine's.
if ! "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" .whl/*.whl; then
    echo "!!! the staged wheels did not install: nothing else can run"
    exit 1
fi
# orch from the checkout (no build, no writes to the machine's Python); the staged packages
# first, so that they win over any older copy there (typing-extensions).
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PATH="$SITE/bin:$PATH"

part "versions"
"$PY" - <<'EOF' || failed versions $?
import importlib.metadata as m
import platform

for name in ("torch", "transformers", "tokenizers", "pyarrow", "numpy", "ray", "deepspeed",
             "pydantic", "typer"):
    try:
        print(f"{name:13} {m.version(name)}")
    except m.PackageNotFoundError:
        print(f"{name:13} MISSING")
import torch

print("python       ", platform.python_version())
print("cuda         ", torch.version.cuda, "available:", torch.cuda.is_available(),
      "devices:", torch.cuda.device_count())
if torch.cuda.is_available():
    print("gpu          ", torch.cuda.get_device_name())
import orchestrator.driver, ray, deepspeed  # noqa: E401,F401  orch's GPU path imports
print("orch imports: ok")
EOF
nvidia-smi || echo "(no nvidia-smi)"

# The tests read their real data from ../shared/data beside the checkout, which does not
# travel with it: stage.sh put a copy in .whl/shared-data.
if [ ! -f ../shared/data/tinyshakespeare.txt ] && [ -d .whl/shared-data ]; then
    mkdir -p ../shared/data && cp .whl/shared-data/* ../shared/data/
fi

part "pytest -m gpu tests/test_gpu.py (timeout ${PYTEST_TIMEOUT} s)"
# orch's pytest plugin (the orch_ray fixture) comes with an installed orch; from the checkout
# it is named here. The session's Ray gets the machine's CPUs, not the CI machine's 2.
plugin=()
"$PY" -c 'import importlib.metadata as m; m.version("orch")' 2>/dev/null ||
    plugin=(-p orchestrator.pytest_plugin)
timeout -k 10 "$PYTEST_TIMEOUT" "$PY" -m pytest -m gpu tests/test_gpu.py "${plugin[@]}" \
    -o orch_ray_num_cpus= -p no:cacheprovider --junitxml="$OUT/pytest_gpu.xml"
code=$?
[ "$code" -eq 0 ] || { failed pytest "$code"; stop_leftover_ray "$code"; }

part "bench/gpu_throughput.py ${BENCH_ARGS} (timeout ${BENCH_TIMEOUT} s)"
# BENCH_ARGS=--rehearse runs this whole script on a CPU machine, at toy sizes.
# shellcheck disable=SC2086 # BENCH_ARGS: words on purpose
timeout -k 10 "$BENCH_TIMEOUT" "$PY" bench/gpu_throughput.py $BENCH_ARGS
code=$?
[ "$code" -eq 0 ] || { failed bench "$code"; stop_leftover_ray "$code"; }
# Only figures written by this run (the bench saves after each case), never an older file.
for name in gpu_throughput.json gpu_throughput_rehearsal.json; do
    if [ "$OUT" != bench/results ] && [ bench/results/$name -nt "$OUT/log.start" ]; then
        cp bench/results/$name "$OUT/"
    fi
done
rm -f "$OUT/log.start"

part "done: exit $status"
exit "$status"
