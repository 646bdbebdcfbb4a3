#!/usr/bin/env bash
# Builds what scripts/gpu-check.sh needs on a GPU machine without Rust: the release `tome`
# binary and the test executables of the GPU test crates, stripped and xz-compressed into
# gpu-bin/ (ignored by git; it travels with the checkout):
#
#   gpu-bin/tome.xz
#   gpu-bin/tests/<crate>-<testname>.xz     one per test target (lib, tests/*.rs)
#   gpu-bin/build-root                      this checkout's path: tests find their fixtures by
#                                           the path they were built at (CARGO_MANIFEST_DIR)
#
# Usage: scripts/gpu-build.sh
#   GPU_TEST_CRATES="tome-gpu tome-model" scripts/gpu-build.sh   # more crates' tests
#
# Fails if gpu-bin/ comes to more than 56 MiB (the GPU machine takes 64 MiB with the checkout).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
GPU_TEST_CRATES="${GPU_TEST_CRATES:-tome-gpu}"
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

    local crate_args=() crate
    # shellcheck disable=SC2086  # GPU_TEST_CRATES is a space-separated list of names
    for crate in ${GPU_TEST_CRATES}; do
        crate_args+=(-p "${crate}")
    done
    echo "== cargo test --release --no-run ${crate_args[*]}"
    local listing
    listing="$(mktemp)"
    # shellcheck disable=SC2086  # GPU_TEST_CRATES is a space-separated list of names
    cargo test --release --locked "${crate_args[@]}" --no-run --message-format=json \
        | list_test_executables ${GPU_TEST_CRATES} >"${listing}"
    if [[ ! -s "${listing}" ]]; then
        echo "no test executables found for: ${GPU_TEST_CRATES}" >&2
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
