"""The cache directory: content-keyed artifacts, atomic writes, loud damage.

Everything expensive (trained zoo weights, features, similarity, stitches,
profiles, verify measurements) lives under one root, keyed by a hash of what it
depends on. A file is written to a temporary name and renamed into place, so a
killed run never leaves half a file behind; a file that fails to load is
reported by path and never silently recomputed over. Runs may share one cache:
an artifact two runs start together is made once, under a lock on its key
(`file_lock`), and the other run waits for it and loads it.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from .errors import USAGE, DeryError

T = TypeVar("T")
_UMASK = os.umask(0)
os.umask(_UMASK)


def cache_root() -> Path:
    """`DERY_CACHE_DIR`, else `$XDG_CACHE_HOME/dery`, else `~/.cache/dery`."""
    explicit = os.environ.get("DERY_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "dery"


def content_key(*parts: Any) -> str:
    """A short stable hash of JSON-serialisable parts (dict keys sorted)."""
    blob = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def ensure_dir(path: Path, what: str) -> Path:
    """Create a directory or fail with a clear message naming it."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-", delete=True)
        probe.close()
    except OSError as e:
        raise DeryError(f"{what} {path} is not writable ({e.strerror or e}); choose another directory",
                        exit_code=USAGE) from e
    return path


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive lock for `path` across processes: flock on the sidecar `.<name>.lock`, which stays
    in place (the kernel drops the lock when its holder ends, however it ends)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f".{path.name}.lock"), "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def atomic_write(path: Path, writer: Callable[[Path], None]) -> Path:
    """Run `writer(tmp_path)` and rename the result onto `path` atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        writer(tmp_path)
        os.chmod(tmp_path, 0o666 & ~_UMASK)
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()
    return path


def atomic_write_bytes(path: Path, data: bytes) -> Path:
    """Write bytes to `path` atomically."""
    return atomic_write(path, lambda p: p.write_bytes(data))


def atomic_write_json(path: Path, obj: Any) -> Path:
    """Write pretty, key-sorted JSON to `path` atomically (deterministic bytes)."""
    text = json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n"
    return atomic_write_bytes(path, text.encode())


def save_npy(array: Any, path: Path) -> None:
    """np.save to exactly `path` (np.save on a name would append .npy)."""
    import numpy as np

    with open(path, "wb") as f:
        np.save(f, array, allow_pickle=False)


def load_npy(path: Path) -> Any:
    """np.load without pickles."""
    import numpy as np

    return np.load(path, allow_pickle=False)


def damaged(path: Path, what: str, why: object) -> DeryError:
    """The error for a file that exists but cannot be used."""
    return DeryError(f"damaged {what} file {path}: {why}; move it away or delete it to recompute")


def read_json(path: Path, what: str) -> Any:
    """Load JSON, naming the file when it is damaged."""
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise damaged(path, what, e) from e


class Cache:
    """Content-keyed artifacts under one root: `<root>/<kind>/<key><suffix>`."""

    def __init__(self, root: Path | None = None):
        self.root = Path(root) if root is not None else cache_root()

    def path(self, kind: str, key: str, suffix: str) -> Path:
        """Where the artifact of this kind and key lives (it may not exist yet)."""
        return self.root / kind / f"{key}{suffix}"

    def ensure_writable(self) -> None:
        """Fail early, with the path, when the cache cannot be written."""
        ensure_dir(self.root, "cache directory (DERY_CACHE_DIR)")

    def get_or_make(self, kind: str, key: str, suffix: str, *, make: Callable[[], T],
                    save: Callable[[T, Path], None], load: Callable[[Path], T], what: str,
                    keep: Callable[[T], bool] = lambda value: True) -> T:
        """Load the artifact if present (naming it if damaged), else make, save and return it; a value that
        `keep` rejects is returned unsaved. The make runs under the key's lock, so a run that asks for the
        same artifact meanwhile waits and loads it instead of making it again."""
        path = self.path(kind, key, suffix)
        if not path.exists():
            with file_lock(path):
                if not path.exists():
                    value = make()
                    if keep(value):
                        atomic_write(path, lambda p: save(value, p))
                    return value
        try:
            return load(path)
        except DeryError:
            raise
        except Exception as e:  # any loader failure means the file is unusable
            raise damaged(path, what, e) from e

    def json(self, kind: str, key: str, make: Callable[[], Any], what: str,
             keep: Callable[[Any], bool] = lambda value: True) -> Any:
        """`get_or_make` for JSON-serialisable values."""
        def save(v: Any, p: Path) -> None:
            p.write_text(json.dumps(v, indent=1, sort_keys=True, allow_nan=False))
        return self.get_or_make(kind, key, ".json", make=make, save=save,
                                load=lambda p: read_json(p, what), what=what, keep=keep)
