#!/usr/bin/env bash
# Runs a command on a fresh machine, as a new user's would be: a minimal Debian root (debootstrap's
# minbase, plus ca-certificates) holding this machine's Rust toolchain and nothing else, with the
# repository copied in as a clone would have it (tracked and new files; nothing ignored, so no
# target/, data/ or .tools/). Whatever else the command needs, the project's own scripts must
# install, so a missing install step fails here rather than on a user's machine. CI runs the
# README's test command this way (.ci/run).
#
#   scripts/fresh-machine.sh scripts/test.sh
#
# Needs root, apt (debootstrap is installed when missing), unshare and git. The root lives in a
# temporary folder (or FRESH_ROOT_DIR) and is removed afterwards, also when interrupted; the
# command runs in its own mount and PID namespaces, so nothing it starts or mounts outlives it. The Debian release and
# mirror are FRESH_SUITE (default: bookworm) and FRESH_MIRROR (default: the Debian mirror).
# Carried over from this machine, as any machine on its network has them: its DNS settings, its
# apt settings (apt.conf.d), the certificate authorities it adds to Debian's
# (/usr/local/share/ca-certificates) and proxy variables.
set -euo pipefail

suite="${FRESH_SUITE:-bookworm}"
mirror="${FRESH_MIRROR:-http://deb.debian.org/debian}"
repo="$(cd "$(dirname "$0")/.." && pwd)"

log() { printf 'fresh-machine: %s\n' "$*" >&2; }

[ $# -gt 0 ] || { log "usage: scripts/fresh-machine.sh COMMAND [ARG...]"; exit 2; }
[ "$(id -u)" -eq 0 ] || { log "must run as root (it builds a Debian root and chroots into it)"; exit 1; }
for tool in unshare chroot git cargo; do
    command -v "$tool" >/dev/null || { log "needs $tool"; exit 1; }
done
if ! command -v debootstrap >/dev/null; then
    log "installing debootstrap"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends debootstrap >/dev/null
fi

toolchain="$(cd "$repo" && rustc --print sysroot)"
root="$(mktemp -d "${FRESH_ROOT_DIR:-${TMPDIR:-/tmp}}/tome-fresh.XXXXXX")"
chmod 755 "$root" # a root directory as Debian has it (apt downloads as _apt)

# The namespaces are gone when the command returns, and their mounts with them; the folder is
# removed only once no mount of this machine's is left under it.
cleanup() {
    if grep -qF " $root/" /proc/self/mountinfo; then
        log "mounts remain under $root; left in place"
        return
    fi
    rm -rf "$root"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

log "debootstrap $suite (minbase) into $root"
started=$SECONDS
if ! debootstrap --variant=minbase --include=ca-certificates "$suite" "$root" "$mirror" >"$root.debootstrap.log" 2>&1; then
    tail -20 "$root.debootstrap.log" >&2
    rm -f "$root.debootstrap.log"
    exit 1
fi
rm -f "$root.debootstrap.log"
log "root ready in $((SECONDS - started)) s"

cp /etc/resolv.conf /etc/hosts "$root/etc/"
if [ -d /etc/apt/apt.conf.d ]; then
    cp -r /etc/apt/apt.conf.d/. "$root/etc/apt/apt.conf.d/"
fi
if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
    cp /usr/local/share/ca-certificates/*.crt "$root/usr/local/share/ca-certificates/"
    chroot "$root" update-ca-certificates >/dev/null 2>&1
fi

mkdir -p "$root/src" "$root/opt/rust"
(cd "$repo" && git ls-files -z --cached --others --exclude-standard) |
    (cd "$repo" && tar --null --files-from=- --ignore-failed-read -cf - 2>/dev/null) |
    tar -xf - -C "$root/src"

env_vars=(PATH=/opt/rust/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
    HOME=/root LANG=C.UTF-8 TERM=dumb "CI=${CI:-}")
for name in http_proxy https_proxy no_proxy HTTP_PROXY HTTPS_PROXY NO_PROXY; do
    [ -n "${!name:-}" ] && env_vars+=("$name=${!name}")
done

log "running in the fresh root: $*"
unshare --mount --pid --fork --kill-child --propagation private bash -euo pipefail -c '
    root="$1" toolchain="$2"; shift 2
    mount -t proc proc "$root/proc"
    mount --rbind /dev "$root/dev"
    mount --rbind /sys "$root/sys"
    mount --bind "$toolchain" "$root/opt/rust"
    mount -o remount,bind,ro "$root/opt/rust"
    exec chroot "$root" /usr/bin/env -i "$@"
' fresh "$root" "$toolchain" "${env_vars[@]}" /bin/bash -c 'cd /src && exec "$@"' command "$@" &
# Waiting in the background lets an interrupt end the command before the root is removed:
# unshare ignores SIGTERM while it waits, and killing it kills its namespace's first process
# (--kill-child), which ends every process of the namespace.
child=$!
trap 'kill -KILL "$child" 2>/dev/null; wait "$child"; exit 143' TERM
trap 'kill -KILL "$child" 2>/dev/null; wait "$child"; exit 130' INT
status=0
wait "$child" || status=$?
log "the command exited with $status"
exit "$status"
