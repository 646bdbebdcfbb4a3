#!/usr/bin/env bash
# Installs the system tools the build and tests need, when missing (Debian/Ubuntu packages):
#   protoc (protobuf-compiler): etcd-client's build script compiles etcd's protos with it;
#   etcd (etcd-server): the membership tests start a real etcd of their own.
# Usage: scripts/prereqs.sh protoc [etcd]
set -euo pipefail
declare -A package=([protoc]=protobuf-compiler [etcd]=etcd-server)
missing=()
for tool in "$@"; do
    command -v "$tool" >/dev/null || missing+=("${package[$tool]}")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if ! command -v apt-get >/dev/null; then
    echo "prereqs: install ${missing[*]} with your package manager" >&2
    exit 1
fi
sudo=""
[ "$(id -u)" -ne 0 ] && sudo=sudo
echo "prereqs: installing ${missing[*]}" >&2
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
