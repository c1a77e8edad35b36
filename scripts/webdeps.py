"""Install the web app's front-end libraries from the npm registry; no Node needed.

    python scripts/webdeps.py            install what gateway/web/webdeps.lock.json names
    python scripts/webdeps.py --check    exit 1 (saying what) unless they are installed
    python scripts/webdeps.py --relock   refresh each package's tarball URL, integrity and
                                         licence from the registry's metadata of its version

For each package of the lock: download its tarball, check it against the lock's `integrity`
(the sha512 the registry publishes; a mismatch stops everything), and unpack only the files the
lock names into `gateway/web/vendor/` (git-ignored), which the gateway serves at
`/static/vendor/`. The new folder replaces the old one whole, so a failed run leaves the
previous install as it was. Nothing is done when the installed set matches the lock (a stamp
holds the lock's SHA-256), so `scripts/bootstrap` runs this on every start at no cost.

`npm_config_registry` (npm's own variable) points the downloads at a mirror of the registry;
HTTPS_PROXY is honoured as by any urllib client.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import io
import json
import os
import shutil
import sys
import tarfile
import tempfile
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gateway.web.vendor import (
    LOCK_PATH,
    STAMP,
    VENDOR_DIR,
    Package,
    load_lock,
    lock_digest,
    missing,
)

REGISTRY = "https://registry.npmjs.org"
_TIMEOUT_S = 60


class WebDepsError(Exception):
    """A download, a hash or a tarball that is not what the lock says; `str()` is one line."""


def _registry() -> str:
    return (os.environ.get("npm_config_registry") or REGISTRY).rstrip("/")


def _get(url: str) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=_TIMEOUT_S) as response:
            data: bytes = response.read()
            return data
    except OSError as exc:
        raise WebDepsError(f"cannot download {url}: {exc}") from exc


def _tarball_url(package: Package) -> str:
    registry = _registry()
    if registry != REGISTRY and package.tarball.startswith(REGISTRY):
        return registry + package.tarball[len(REGISTRY) :]
    return package.tarball


def _check_integrity(package: Package, data: bytes) -> None:
    algorithm, _, expected = package.integrity.partition("-")
    if algorithm != "sha512" or not expected:
        raise WebDepsError(f"{package.name}: the lock needs a sha512 integrity, not {algorithm!r}")
    actual = base64.b64encode(hashlib.sha512(data).digest()).decode()
    if actual != expected:
        raise WebDepsError(
            f"{package.name}@{package.version}: tarball's sha512 is {actual}, the lock says "
            f"{expected}: refusing it"
        )


def _unpack(package: Package, data: bytes, into: Path) -> None:
    wanted = dict(package.files)
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        for member in tar:
            # npm tarballs put everything under one top folder (usually "package/").
            inner = member.name.split("/", 1)[1] if "/" in member.name else member.name
            target = wanted.pop(inner, None)
            if target is None:
                continue
            if not member.isfile():
                raise WebDepsError(f"{package.name}: {inner} is not a plain file in the tarball")
            source = tar.extractfile(member)
            assert source is not None
            path = into / target
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(source.read())
    if wanted:
        raise WebDepsError(
            f"{package.name}@{package.version}: not in its tarball: {sorted(wanted)}"
        )


def install(*, quiet: bool = False, vendor: Path = VENDOR_DIR, lock: Path = LOCK_PATH) -> bool:
    """Install the lock's files into `vendor`; False when they already were."""
    if not missing(vendor, lock):
        return False
    packages = load_lock(lock)
    vendor.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".vendor-", dir=vendor.parent))
    try:
        for package in packages:
            url = _tarball_url(package)
            if not quiet:
                print(f"webdeps: {package.name}@{package.version} from {url}", file=sys.stderr)
            data = _get(url)
            _check_integrity(package, data)
            _unpack(package, data, staging)
        (staging / STAMP).write_text(lock_digest(lock) + "\n")
        old = vendor.with_name(vendor.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        if vendor.exists():
            vendor.rename(old)
        staging.rename(vendor)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return True


def relock(lock: Path = LOCK_PATH) -> None:
    """Fill each package's tarball, integrity and licence from the registry's metadata."""
    data = json.loads(lock.read_text())
    for entry in data["packages"]:
        meta = json.loads(_get(f"{_registry()}/{entry['name']}/{entry['version']}"))
        entry["tarball"] = meta["dist"]["tarball"]
        entry["integrity"] = meta["dist"]["integrity"]
        entry["license"] = meta.get("license", "")
    lock.write_text(json.dumps(data, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="webdeps", description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="only say whether installed")
    parser.add_argument("--relock", action="store_true", help="refresh the lock from the registry")
    parser.add_argument("--quiet", action="store_true", help="print nothing when all is well")
    args = parser.parse_args(argv)
    try:
        if args.relock:
            relock()
            return 0
        if args.check:
            absent = missing()
            if absent:
                print(f"webdeps: not installed: {', '.join(absent)}", file=sys.stderr)
                return 1
            return 0
        if install(quiet=args.quiet) and not args.quiet:
            print(f"webdeps: installed into {VENDOR_DIR}", file=sys.stderr)
    except WebDepsError as exc:
        print(f"webdeps: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
