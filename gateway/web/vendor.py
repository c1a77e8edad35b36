"""The web app's front-end libraries: pinned npm packages, installed beside this module.

`webdeps.lock.json` (committed) names each package with its exact version, the registry's
tarball URL, the tarball's `integrity` (sha512, as the registry publishes it) and the files the
app uses, each with the path it is served under `/static/vendor/`. `scripts/webdeps.py` (run
by `scripts/bootstrap`, so by `scripts/up` and `scripts/test`) downloads the tarballs, checks
their hashes and unpacks those files into `vendor/` (git-ignored); nothing of them is in the
repository, and nothing is fetched at run time. Standard library only: the installer imports
this module before anything else may be installed.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

__all__ = ["INSTALL_COMMAND", "LOCK_PATH", "VENDOR_DIR", "Package", "load_lock", "missing"]

HERE = Path(__file__).resolve().parent
LOCK_PATH = HERE / "webdeps.lock.json"
VENDOR_DIR = HERE / "vendor"
STAMP = ".installed"
"""File in `VENDOR_DIR` holding the SHA-256 of the lock it was installed from."""
INSTALL_COMMAND = "python scripts/webdeps.py"


@dataclass(frozen=True)
class Package:
    name: str
    version: str
    tarball: str
    integrity: str
    license: str
    files: dict[str, str]
    """Path inside the package (its tarball's top folder stripped) -> path under vendor/."""


def _safe(path: str) -> str:
    p = PurePosixPath(path)
    if p.is_absolute() or ".." in p.parts or not p.parts:
        raise ValueError(f"unsafe path in the lock: {path!r}")
    return str(p)


def load_lock(path: Path = LOCK_PATH) -> list[Package]:
    """The packages of the lock file, their paths checked to stay inside `vendor/`."""
    data = json.loads(path.read_text())
    return [
        Package(
            name=p["name"],
            version=p["version"],
            tarball=p["tarball"],
            integrity=p["integrity"],
            license=p["license"],
            files={_safe(k): _safe(v) for k, v in p["files"].items()},
        )
        for p in data["packages"]
    ]


def lock_digest(path: Path = LOCK_PATH) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def missing(vendor: Path = VENDOR_DIR, lock: Path = LOCK_PATH) -> list[str]:
    """The served paths not installed (all of them if the installed set is another lock's)."""
    wanted = [target for p in load_lock(lock) for target in p.files.values()]
    stamp = vendor / STAMP
    if not stamp.is_file() or stamp.read_text().strip() != lock_digest(lock):
        return wanted
    return [t for t in wanted if not (vendor / t).is_file()]
