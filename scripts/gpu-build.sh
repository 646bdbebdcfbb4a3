#!/usr/bin/env bash
# Builds what scripts/gpu-check.sh needs on a GPU machine without Rust: the release `tome`
# binary and the GPU test executables, stripped and xz-compressed into gpu-bin/ (ignored by git;
# it travels with the checkout):
#
#   gpu-bin/tome.xz
#   gpu-bin/tests/<crate>-<testname>.xz     one per test target of GPU_TESTS
#   gpu-bin/build-root                      this checkout's path: tests find their fixtures by
#                                           the path they were built at (CARGO_MANIFEST_DIR)
#
# Usage: scripts/gpu-build.sh
#   GPU_TESTS="tome-gpu:gpu tome-model:gpu" scripts/gpu-build.sh   # CRATE:TEST targets to carry
# The default carries the GPU tests of tome-gpu (the kernels against the reference, NVRTC,
# devices), tome-dist (device frames between ranks) and tome-model (models on GPU ranks).
#
# Fails if gpu-bin/ comes to more than 56 MiB (the GPU machine takes 64 MiB with the checkout).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
GPU_TESTS="${GPU_TESTS:-tome-gpu:gpu tome-gpu:compile tome-gpu:devices tome-dist:device_frames tome-model:gpu}"
BIN_DIR="${ROOT}/gpu-bin"
LIMIT_BYTES=$((56 * 1024 * 1024))

cd "${ROOT}"

# Prints "<crate>-<testname>\t<path>" for every test executable in cargo's JSON messages on stdin.
list_test_executables() {
    python3 -c '
import json, sys
crates = set(sys.argv[1:])
for line in sys.stdin:
    try:
        msg = json.loads(line)
    except ValueError:
        continue
    if msg.get("reason") != "compiler-artifact" or not msg.get("executable"):
        continue
    if not msg.get("profile", {}).get("test"):
        continue
    # package_id names the crate: "path+file:///...#tome-gpu@0.1.0" or "tome-gpu 0.1.0 (...)".
    pkg = msg["package_id"]
    # (without "name@" after "#" when the name is the directory'"'"'s).
    if "#" in pkg:
        url, tail = pkg.split("#", 1)
        name = tail.split("@")[0] if "@" in tail else url.rstrip("/").rsplit("/", 1)[-1]
    else:
        name = pkg.split()[0]
    if name not in crates:
        continue
    target = msg["target"]["name"]
    print(name + "-" + target + "\t" + msg["executable"])
' "$@"
}

# strip + xz one executable: compress SRC DEST.xz
compress() {
    local src="$1" dest="$2" tmp
    tmp="$(mktemp)"
    cp "${src}" "${tmp}"
    strip "${tmp}"
    xz -T2 -6 -c "${tmp}" >"${dest}"
    rm -f "${tmp}"
    echo "  $(basename "${dest}"): $(stat -c %s "${dest}") bytes"
}

main() {
    rm -rf "${BIN_DIR}"
    mkdir -p "${BIN_DIR}/tests"

    echo "== cargo build --release -p tome-cli"
    cargo build --release --locked -p tome-cli
    local target_dir
    target_dir="$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')"
    compress "${target_dir}/release/tome" "${BIN_DIR}/tome.xz"

    local listing target crate test
    listing="$(mktemp)"
    for target in ${GPU_TESTS}; do
        crate="${target%%:*}"
        test="${target#*:}"
        echo "== cargo test --release --no-run -p ${crate} --test ${test}"
        cargo test --release --locked -p "${crate}" --test "${test}" --no-run --message-format=json \
            | list_test_executables "${crate}" >>"${listing}"
    done
    if [[ ! -s "${listing}" ]]; then
        echo "no test executables found for: ${GPU_TESTS}" >&2
        exit 1
    fi
    local name path
    while IFS=$'\t' read -r name path; do
        compress "${path}" "${BIN_DIR}/tests/${name}.xz"
    done <"${listing}"
    rm -f "${listing}"
    echo "${ROOT}" >"${BIN_DIR}/build-root"

    local total
    total="$(du -cb "${BIN_DIR}"/tome.xz "${BIN_DIR}"/tests/*.xz | tail -n 1 | cut -f 1)"
    echo "== gpu-bin/: ${total} bytes ($((total / 1024 / 1024)) MiB; limit 56 MiB)"
    if ((total > LIMIT_BYTES)); then
        echo "gpu-bin/ is over 56 MiB: the GPU machine takes 64 MiB with the checkout" >&2
        exit 1
    fi
}

main "$@"
