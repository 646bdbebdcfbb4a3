#!/usr/bin/env bash
# The GPU check: on a machine with one NVIDIA GPU, the CUDA driver and toolkit, and Python with
# torch, transformers and sentence-transformers, but no Rust and no network. Uses the binaries
# scripts/gpu-build.sh put in gpu-bin/ (and data/ where it was carried: the book and tokenizer).
#
# Usage: scripts/gpu-check.sh
#   OUT=DIR                 results (default out/gpu-check): gpu-check.json, gpu-check.md, logs/
#   GPU_CHECK_BUDGET_S=450  the whole run's seconds; each step gets its cap or what is left
#   PYTHON=python3          the Python with torch
#   GPU_CHECK_CPU_DRY_RUN=1 a check of this script where there is no GPU: tiny checkpoints made on
#                           the CPU, small timing cases with the PyTorch side on the CPU (tome
#                           is still asked for --device cuda); its figures mean nothing
#
# Steps (each logged with its time; a failing step is recorded and the next one still runs):
#   unpack       gpu-bin/*.xz into a scratch directory
#   env          nvidia-smi, torch / transformers versions
#   libs         NVRTC and cuBLAS found; LD_LIBRARY_PATH and TOME_NVRTC_DIR exported
#   tests        each test executable with --include-ignored --test-threads=1
#   checkpoints  random-weight models of real sizes and transformers' outputs on the GPU
#   exactness    tome (1 and 4 ranks, cuda; MiniLM on the CPU too) against those outputs
#   timings      scripts/gpu/reference.py beside `tome bench case`
#   report       gpu-check.json and gpu-check.md (scripts/gpu/report.py)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "${ROOT}"
OUT="${OUT:-out/gpu-check}"
mkdir -p "${OUT}"
OUT="$(cd "${OUT}" && pwd)"
PARTS="${OUT}/parts"
LOGS="${OUT}/logs"
BUDGET_S="${GPU_CHECK_BUDGET_S:-450}"
PY="${PYTHON:-python3}"
DRY_RUN="${GPU_CHECK_CPU_DRY_RUN:-0}"
SCRATCH="$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX")"
TOME="${SCRATCH}/bin/tome"
START_S=${SECONDS}

export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_PROGRESS_BARS=1 TOKENIZERS_PARALLELISM=false
export RUST_BACKTRACE=1
export TOME_DATA_DIR="${TOME_DATA_DIR:-${ROOT}/data}"

rm -rf "${PARTS}" "${LOGS}"
mkdir -p "${PARTS}" "${LOGS}"

log() {
    echo "[gpu-check +$((SECONDS - START_S))s] $*" >&2
}

# Seconds a step may take: its cap, or what is left of the budget (at least 5).
left() {
    local cap="$1" rest=$((BUDGET_S - (SECONDS - START_S)))
    ((rest < cap)) && cap=${rest}
    ((cap < 5)) && cap=5
    echo "${cap}"
}

# run_step NAME FUNCTION: runs it with its output in logs/NAME.log, records the outcome in
# parts/steps.jsonl, and never stops the script.
run_step() {
    local name="$1" fn="$2" begin=${SECONDS} rc=0 status
    log "${name} ..."
    "${fn}" >"${LOGS}/${name}.log" 2>&1 || rc=$?
    local seconds=$((SECONDS - begin))
    case "${rc}" in
        0) status="ok" ;;
        124 | 137) status="timed out" ;;
        *) status="failed (exit ${rc}): $({ grep -v '^\s*$' "${LOGS}/${name}.log" || true; } | tail -n 1 | cut -c 1-200)" ;;
    esac
    log "${name}: ${status} (${seconds} s)"
    "${PY}" -c 'import json, sys; print(json.dumps({"step": sys.argv[1], "rc": int(sys.argv[2]), "seconds": int(sys.argv[3]), "status": sys.argv[4]}))' \
        "${name}" "${rc}" "${seconds}" "${status}" >>"${PARTS}/steps.jsonl"
}

# xz -dc FILE, or Python's lzma where xz is missing.
unxz_to() {
    local src="$1" dest="$2"
    if command -v xz >/dev/null; then
        xz -dc "${src}" >"${dest}"
    else
        "${PY}" -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' "${src}" "${dest}"
    fi
    chmod +x "${dest}"
}

step_unpack() {
    mkdir -p "${SCRATCH}/bin" "${SCRATCH}/tests"
    [[ -f gpu-bin/tome.xz ]] || { echo "gpu-bin/tome.xz is missing: run scripts/gpu-build.sh where Rust is"; return 1; }
    unxz_to gpu-bin/tome.xz "${TOME}" || return
    local f
    for f in gpu-bin/tests/*.xz; do
        [[ -e "${f}" ]] || { echo "no test executables in gpu-bin/tests"; return 1; }
        unxz_to "${f}" "${SCRATCH}/tests/$(basename "${f}" .xz)" || return
    done
    ls -l "${SCRATCH}/bin" "${SCRATCH}/tests"
    link_build_root
}

# Tests read their fixtures at the checkout path they were built at (env!("CARGO_MANIFEST_DIR")):
# where that path is absent here, a symbolic link from it to this checkout (best effort).
link_build_root() {
    local built
    built="$(cat gpu-bin/build-root 2>/dev/null || true)"
    if [[ -z "${built}" || "${built}" == "${ROOT}" || -e "${built}" ]]; then
        return 0
    fi
    if mkdir -p "$(dirname "${built}")" 2>/dev/null && ln -s "${ROOT}" "${built}" 2>/dev/null; then
        echo "linked ${built} -> ${ROOT} for the tests' fixtures"
    else
        echo "could not link ${built} -> ${ROOT}: tests that read fixtures may fail"
    fi
}

step_env() {
    timeout "$(left 60)" "${PY}" scripts/gpu/check.py env "${PARTS}/env.json" || return
    cat "${PARTS}/env.json"
}

step_libs() {
    timeout "$(left 60)" "${PY}" scripts/gpu/check.py libs "${SCRATCH}/libs" "${PARTS}/libs.json" >"${SCRATCH}/libs.env" || return
    cat "${SCRATCH}/libs.env"
}

step_tests() {
    local budget
    budget="$(left 180)"
    timeout $((budget + 15)) "${PY}" scripts/gpu/check.py tests "${SCRATCH}/tests" "${PARTS}/tests.json" \
        --logs "${LOGS}/tests" --budget "${budget}" --cap 120 || return
    cat "${PARTS}/tests.json"
}

step_checkpoints() {
    local rc=0 options=(--device cuda)
    [[ "${DRY_RUN}" == 1 ]] && options=(--device cpu --tiny)
    mkdir -p "${SCRATCH}/ck"
    # One JSON line per model, also where a model fails (the exit status is then 1).
    timeout "$(left 120)" "${PY}" scripts/gpu/checkpoints.py "${SCRATCH}/ck" "${options[@]}" >"${PARTS}/checkpoints.jsonl" || rc=$?
    cat "${PARTS}/checkpoints.jsonl"
    cp "${PARTS}/checkpoints.jsonl" "${SCRATCH}/ck/checkpoints.jsonl"
    return "${rc}"
}

step_exactness() {
    local budget
    budget="$(left 120)"
    timeout $((budget + 15)) "${PY}" scripts/gpu/check.py exactness "${TOME}" "${SCRATCH}/ck" "${SCRATCH}/exactness" \
        "${PARTS}/exactness.json" --budget "${budget}" || return
    cat "${PARTS}/exactness.json"
}

step_timings() {
    local budget options=()
    [[ "${DRY_RUN}" == 1 ]] && options=(--device cpu --cases gpu-dense-bf16:256,gpu-dense:256,gpu-longformer:1024,gpu-book:1000)
    budget="$(left 180)"
    timeout $((budget + 15)) "${PY}" scripts/gpu/check.py timings "${TOME}" "${SCRATCH}/ck" "${SCRATCH}/timings" \
        "${PARTS}/timings.json" --budget "${budget}" ${options[@]+"${options[@]}"} || return
    cat "${PARTS}/timings.json"
}

main() {
    log "results in ${OUT}, scratch ${SCRATCH}, budget ${BUDGET_S} s"
    run_step unpack step_unpack
    run_step env step_env
    run_step libs step_libs
    if [[ -s "${SCRATCH}/libs.env" ]]; then
        # shellcheck disable=SC1091  # written by the libs step
        source "${SCRATCH}/libs.env"
    fi
    log "LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-} TOME_NVRTC_DIR=${TOME_NVRTC_DIR:-}"
    run_step tests step_tests
    run_step checkpoints step_checkpoints
    run_step exactness step_exactness
    run_step timings step_timings
}

# On every exit, an interrupted one too: the report from the parts written so far.
finish() {
    "${PY}" scripts/gpu/report.py merge "${OUT}" || log "report failed: the parts are in ${PARTS}"
    rm -rf "${SCRATCH}"
    log "done: ${OUT}/gpu-check.md, ${OUT}/gpu-check.json"
    cat "${OUT}/gpu-check.md" 2>/dev/null || true
}
trap finish EXIT
trap 'exit 143' TERM INT

main "$@"
