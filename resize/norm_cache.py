"""On-disk cache of base-model layer norms, keyed by the checkpoint file's identity.

Spectral norms of a whole base model take a while; they depend only on the checkpoint, so they
are kept in a cache folder, never beside the user's models: the caller's (ComfyUI's user
folder for the node, ``--cache-dir`` on the command line) or else ``default_cache_dir()``:
``$LORA_EXTRACT_CACHE_DIR``, ``$XDG_CACHE_HOME/lora-extract`` or ``~/.cache/lora-extract``.
One file per checkpoint, named after its file name and a digest of its real path. It records the checkpoint's size and mtime (nanoseconds):
when either differs, the cached norms are ignored and recomputed, so a replaced checkpoint
never gets stale norms. Saves are atomic (temp file + rename, the temp file named and swept as
in ``extract.tempfiles``) and merge with what another run may have saved meanwhile.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass

from ..extract.tempfiles import write_text_atomic

log = logging.getLogger(__name__)

CACHE_FORMAT = 1
CACHE_SUFFIX = ".lora_norms.json"


@dataclass(frozen=True)
class FileIdentity:
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, path: str) -> FileIdentity:
        st = os.stat(path)
        return cls(st.st_size, st.st_mtime_ns)


def default_cache_dir() -> str:
    """The user's cache folder for this pack (nothing is written until a cache is saved)."""
    env = os.environ.get("LORA_EXTRACT_CACHE_DIR")
    if env:
        return os.path.abspath(os.path.expanduser(env))
    xdg = os.environ.get("XDG_CACHE_HOME")
    root = xdg if xdg and os.path.isabs(xdg) else os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "lora-extract")


def cache_path(checkpoint: str, cache_dir: str | None = None) -> str:
    """Where the cache for ``checkpoint`` lives inside ``cache_dir`` (default: the user's)."""
    real = os.path.realpath(checkpoint)
    digest = hashlib.sha1(real.encode("utf-8")).hexdigest()[:16]
    return os.path.join(cache_dir or default_cache_dir(),
                        f"{os.path.basename(real)}.{digest}{CACHE_SUFFIX}")


class NormCache:
    """Per-layer norms (``{target id: {"fro": x, "spn": y}}``) of one checkpoint, or in memory only."""

    def __init__(self, checkpoint: str | None, cache_dir: str | None = None) -> None:
        self.checkpoint = checkpoint
        self.path = cache_path(checkpoint, cache_dir) if checkpoint else None
        self.identity = FileIdentity.of(checkpoint) if checkpoint else None
        self.entries: dict[str, dict[str, float]] = {}
        self.loaded_from: str | None = None
        self.dirty = False
        if self.path:
            got = self._read(self.path)
            if got is not None:
                self.entries, self.loaded_from = got, self.path

    def _read(self, path: str) -> dict[str, dict[str, float]] | None:
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            log.warning("ignoring unreadable norms cache %s (%s)", path, e)
            return None
        if (not isinstance(data, dict) or data.get("format") != CACHE_FORMAT
                or data.get("identity") != self._identity_dict()):
            log.info("norms cache %s is for another version of the checkpoint; recomputing", path)
            return None
        entries = data.get("norms")
        return entries if isinstance(entries, dict) else None

    def _identity_dict(self) -> dict[str, int] | None:
        if self.identity is None:
            return None
        return {"size": self.identity.size, "mtime_ns": self.identity.mtime_ns}

    def get(self, ident: str, what: str) -> float | None:
        v = self.entries.get(ident, {}).get(what)
        return float(v) if isinstance(v, (int, float)) else None

    def put(self, ident: str, what: str, value: float) -> None:
        self.entries.setdefault(ident, {})[what] = float(value)
        self.dirty = True

    def save(self) -> str | None:
        """Write the cache (if anything new was computed); returns the path written, or None."""
        if not self.dirty or not self.checkpoint:
            return None
        if FileIdentity.of(self.checkpoint) != self.identity:
            log.warning("%s changed during the run; norms not cached", self.checkpoint)
            return None
        path = self.path
        assert path is not None
        try:
            merged = dict(self._read(path) or {})
            for k, v in self.entries.items():
                merged.setdefault(k, {}).update(v)
            _write_json_atomic(path, {"format": CACHE_FORMAT, "identity": self._identity_dict(),
                                      "checkpoint": os.path.basename(self.checkpoint),
                                      "norms": merged})
        except OSError as e:
            log.warning("could not write the norms cache %s (%s); the next run recomputes them",
                        path, e)
            return None
        self.dirty = False
        return path


def _write_json_atomic(path: str, data: object) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_text_atomic(path, json.dumps(data, separators=(",", ":")), public=False)
