#!/usr/bin/env bash
# Generates the Python client's gRPC stubs from proto/tome/v1/tome.proto with a pinned
# grpcio-tools, so the committed files change only when the proto does:
#   clients/python/src/tome_client/_proto/tome/v1/{tome_pb2.py,tome_pb2.pyi,tome_pb2_grpc.py}
# Their imports are rewritten to the package's own (tome_client._proto.tome.v1), so nothing
# named `tome` lands at the top level of a user's environment.
#
#   scripts/gen_python_stubs.sh          # rewrites the committed stubs
#   scripts/gen_python_stubs.sh DIR      # writes DIR/tome/v1/... instead (the client's tests
#                                        # compare that with the committed files)
#
# The grpcio-tools below is used when python3 (or $PYTHON) already imports that version;
# otherwise it is installed from PyPI into target/python-grpc-tools first. Changing the pin
# changes the runtime floor of the generated code: keep clients/python/pyproject.toml's
# grpcio and protobuf bounds at the versions the stubs name (the tests check they agree).
set -euo pipefail
cd "$(dirname "$0")/.."

readonly GRPCIO_TOOLS_PIN="grpcio-tools==1.85.4"
readonly PROTO_ROOT=proto
readonly PROTO=tome/v1/tome.proto
readonly PACKAGE=tome_client._proto

out="${1:-clients/python/src/tome_client/_proto}"
python="${PYTHON:-python3}"
want="${GRPCIO_TOOLS_PIN#*==}"

have_tools() {
    "$python" - "$want" <<'PY' >/dev/null 2>&1
import sys
from importlib.metadata import version
import grpc_tools.protoc  # noqa: F401
sys.exit(0 if version("grpcio-tools") == sys.argv[1] else 1)
PY
}

if ! have_tools; then
    tools_dir="$PWD/target/python-grpc-tools"
    export PYTHONPATH="$tools_dir${PYTHONPATH:+:$PYTHONPATH}"
    if ! have_tools; then
        printf 'gen_python_stubs: installing %s into %s\n' "$GRPCIO_TOOLS_PIN" "$tools_dir" >&2
        "$python" -m pip install --quiet --upgrade --target "$tools_dir" "$GRPCIO_TOOLS_PIN"
        have_tools || { printf 'gen_python_stubs: %s does not import after installing\n' "$GRPCIO_TOOLS_PIN" >&2; exit 1; }
    fi
fi

scratch="$(mktemp -d "${TMPDIR:-/tmp}/tome-stubs.XXXXXX")"
trap 'rm -rf "$scratch"' EXIT
"$python" -m grpc_tools.protoc --proto_path="$PROTO_ROOT" \
    --python_out="$scratch" --pyi_out="$scratch" --grpc_python_out="$scratch" "$PROTO"

generated="$scratch/tome/v1"
# The service stubs import the messages as a top-level `tome.v1`; the messages register their
# classes under that module name. Both become the subpackage's.
sed -i "s/^from tome\.v1 import tome_pb2 as /from $PACKAGE.tome.v1 import tome_pb2 as /" "$generated/tome_pb2_grpc.py"
sed -i "s/'tome\.v1\.tome_pb2'/'$PACKAGE.tome.v1.tome_pb2'/" "$generated/tome_pb2.py"
grep -q "^from $PACKAGE.tome.v1 import tome_pb2 as " "$generated/tome_pb2_grpc.py" || { echo "gen_python_stubs: the stubs' import was not rewritten" >&2; exit 1; }
grep -q "'$PACKAGE.tome.v1.tome_pb2'" "$generated/tome_pb2.py" || { echo "gen_python_stubs: the messages' module name was not rewritten" >&2; exit 1; }

mkdir -p "$out/tome/v1"
for file in tome_pb2.py tome_pb2.pyi tome_pb2_grpc.py; do
    cp "$generated/$file" "$out/tome/v1/$file"
done
printf 'gen_python_stubs: wrote %s/tome/v1 with %s\n' "$out" "$GRPCIO_TOOLS_PIN" >&2
