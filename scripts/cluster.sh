#!/usr/bin/env bash
# A cluster on this machine: etcd, N workers and a coordinator on loopback, until Ctrl-C.
#   scripts/cluster.sh [N]        then: tome process BOOK.txt --coordinator http://127.0.0.1:50051
# Needs etcd (scripts/prereqs.sh etcd) and a release build (cargo build --release -p tome-cli).
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-4}
tome=target/release/tome
model=${TOME_MODEL:-data/models/all-MiniLM-L6-v2}
dir=$(mktemp -d -t tome-cluster-XXXX)
pids=()
trap 'kill -TERM "${pids[@]}" 2>/dev/null; wait; rm -rf "$dir"' EXIT INT TERM
etcd --data-dir "$dir/etcd" --listen-client-urls http://127.0.0.1:2379 \
     --advertise-client-urls http://127.0.0.1:2379 --listen-peer-urls http://127.0.0.1:2380 \
     >"$dir/etcd.log" 2>&1 &
pids+=($!)
for i in $(seq 0 $((n - 1))); do
    "$tome" serve worker --model "$model" --listen "127.0.0.1:$((50061 + i))" \
        --etcd http://127.0.0.1:2379 --log info 2>"$dir/worker$i.log" &
    pids+=($!)
done
"$tome" serve coordinator --model "$model" --listen 127.0.0.1:50051 --etcd http://127.0.0.1:2379 \
    --ranks "$n" --metrics-listen 127.0.0.1:9090 --log info 2>"$dir/coordinator.log" &
pids+=($!)
echo "coordinator on http://127.0.0.1:50051 with $n workers (metrics on :9090, logs in $dir); Ctrl-C stops"
wait
