#!/usr/bin/env bash
# Stage into .whl/ (repository root, ignored by git) what the GPU machine lacks, so that it can
# travel with the working tree: that machine has Python 3.12, torch, transformers, pyarrow,
# typer and numpy, but no Ray, DeepSpeed, MLflow or pydantic, and no package registry
# (/work/.library/device/KINDS.md lists what it has). Tree + .whl must stay under 64 MiB.
#
#   bench/gpu/stage.sh            # then: run bench/gpu/check.sh there, carrying .whl
#
# Versions are the ones orch is developed with: read from the venv ($ORCH_PYTHON, default
# .venv/bin/python), so the GPU check runs what the tests here ran. Downloads are cached in
# $ORCH_STAGE_CACHE (default ~/.cache/orch-gpu-stage) and reused.
set -euo pipefail
cd "$(dirname "$0")/../.."

PY=${ORCH_PYTHON:-.venv/bin/python}
CACHE=${ORCH_STAGE_CACHE:-$HOME/.cache/orch-gpu-stage}
STAGE=.whl
LIMIT=$((64 * 1024 * 1024))
mkdir -p "$CACHE"
rm -rf "$STAGE"
mkdir -p "$STAGE/shared-data"

version() { "$PY" -c 'import importlib.metadata as m, sys; print(m.version(sys.argv[1]))' "$1"; }

# Binary wheels for CPython 3.12 on x86-64 Linux, whatever this machine is; --no-deps because
# the list below names every missing requirement (the rest is already there).
download() {
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d "$CACHE" "$@"
}

# What is missing there, with why:
#   pydantic, pydantic-core, annotated-types, typing-inspection: orch's spec, and DeepSpeed's
#     config; typing-extensions too, since pydantic-core's floor may be above the image's.
#   jsonschema, jsonschema-specifications, referencing, rpds-py: a requirement of Ray's core
#     (its runtime_env validation), absent there.
#   hjson: DeepSpeed's config reader.
# Not staged: Ray's `default` extra (dashboard, Jobs API), which a local `orch run` does not
# start, and MLflow, which the GPU check turns off (tracking=False).
PACKAGES=(pydantic pydantic-core annotated-types typing-inspection typing-extensions
    jsonschema jsonschema-specifications referencing rpds-py hjson)
for name in "${PACKAGES[@]}"; do
    download "$name==$(version "$name")"
done
for name in "${PACKAGES[@]}"; do
    # pip saves names normalized (pydantic_core-...); match either spelling.
    pattern=$(echo "$name" | tr '-' '_')
    cp "$CACHE"/"$pattern"-"$(version "$name")"-*.whl "$STAGE"/
done

# Ray: its cp312 wheel (79 MB) less what orch never loads (bench/gpu/slim_wheel.py says why).
RAY=$(version ray)
download "ray==$RAY"
"$PY" bench/gpu/slim_wheel.py "$CACHE"/ray-"$RAY"-cp312-*.whl \
    "$STAGE/ray-$RAY-cp312-cp312-manylinux2014_x86_64.whl" \
    ray/jars/ ray/dashboard/client/ ray/rllib/

# DeepSpeed: built from its sdist with no ops compiled (DS_BUILD_OPS=0), a pure-Python wheel.
# ZeRO with a torch optimizer needs none of its kernels; any it wanted would JIT-compile there.
DS=$(version deepspeed)
DS_WHEEL="$CACHE/deepspeed-$DS-py3-none-any.whl"
if [ ! -f "$DS_WHEEL" ]; then
    "$PY" -m pip download -q --no-deps --no-binary=:all: -d "$CACHE" "deepspeed==$DS"
    # No build isolation: DeepSpeed's setup.py imports torch, which the venv already has.
    DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$CACHE" \
        "$CACHE/deepspeed-$DS.tar.gz"
fi
cp "$DS_WHEEL" "$STAGE"/

# The tests' real data (tests/builders.py reads ../shared/data beside the checkout, which does
# not travel): check.sh puts it back there.
SHARED=${ORCH_SHARED_DATA:-../shared/data}
cp "$SHARED"/tinyshakespeare.txt "$SHARED"/t10k-images-idx3-ubyte.gz \
    "$SHARED"/t10k-labels-idx1-ubyte.gz "$STAGE/shared-data/"

# What travels: tracked files, untracked files git does not ignore, and .whl.
tree=$( { git ls-files -z; git ls-files -z --others --exclude-standard; } \
    | xargs -0 du -cb 2>/dev/null | awk '$2 == "total" {s += $1} END {print s + 0}')
staged=$(du -cb "$STAGE" | awk 'END {print $1}')
echo "staged in $STAGE:"
(cd "$STAGE" && find . -type f -printf '%s\t%p\n' | sort -rn | awk -F'\t' '{printf "  %8.2f MB  %s\n", $1 / 1e6, $2}')
total=$((tree + staged))
awk -v t="$tree" -v s="$staged" -v l="$LIMIT" -v d="$STAGE" 'BEGIN {
    printf "working tree %.2f MB + %s %.2f MB = %.2f MB (limit 64 MiB = %.2f MB)\n",
        t / 1e6, d, s / 1e6, (t + s) / 1e6, l / 1e6 }'
if [ "$total" -gt "$LIMIT" ]; then
    echo "over the 64 MiB the GPU machine takes: stage less" >&2
    exit 1
fi
