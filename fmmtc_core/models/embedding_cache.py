"""On-disk cache of foundation-encoder embeddings, so a cohort is embedded once.

An entry is keyed by the encoder's preprocessing hash (checkpoint digest + every preprocessing
parameter, :attr:`~fmmtc_core.models.encoder_base.FoundationEncoder.preprocessing_hash`) and the
digest of the scan's series and TR, so a changed checkpoint, scaling statistic, atlas order,
precision or scan never reads a stale value. Entries are safetensors files (nothing is ever
unpickled), written to a temporary name and renamed, so concurrent processes never see half a
file. A damaged entry is treated as a miss and rewritten.

Location: ``<cache folder>/embeddings`` (:func:`fmmtc_core.config.embedding_cache_dir`: under
``FMMTC_CACHE_DIR``, else under ``FMMTC_DATA_DIR`` when that is set, else under
``$XDG_CACHE_HOME/fmmtc`` or ``~/.cache/fmmtc``). Deleting the folder is always safe.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

__all__ = ["EmbeddingCache"]


class EmbeddingCache:
    """A folder of cached embedding arrays, one safetensors file per key.

    Parameters
    ----------
    root : path or None, default=None
        Cache folder; default :func:`fmmtc_core.config.embedding_cache_dir`. Created on first
        write.
    """

    def __init__(self, root: str | os.PathLike | None = None) -> None:
        if root is None:
            from fmmtc_core.config import embedding_cache_dir

            root = embedding_cache_dir()
        self.root = Path(root)

    def path(self, key: str) -> Path:
        """File of ``key`` (two-level fan-out, so no folder holds a whole cohort's files).

        Parameters
        ----------
        key : str
            Lowercase hexadecimal digest.

        Returns
        -------
        Path
            ``<root>/<first two digits>/<key>.safetensors`` (it may not exist).

        Raises
        ------
        ValueError
            ``key`` is empty or not lowercase hexadecimal.
        """
        if not key or not all(c in "0123456789abcdef" for c in key):
            raise ValueError(f"cache keys are lowercase hexadecimal digests, got {key!r}")
        return self.root / key[:2] / f"{key}.safetensors"

    def get(self, key: str) -> np.ndarray | None:
        """The cached array of ``key``, or None (missing or unreadable).

        Parameters
        ----------
        key : str
            Lowercase hexadecimal digest.

        Returns
        -------
        ndarray or None
            The array as stored, or None when the file is missing or damaged.

        Raises
        ------
        ValueError
            ``key`` is not a lowercase hexadecimal digest (see :meth:`path`).
        """
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        path = self.path(key)
        if not path.is_file():
            return None
        try:
            return load_file(str(path))["embedding"]
        except (SafetensorError, OSError, KeyError, ValueError):
            return None  # damaged: recomputed and rewritten by the caller

    def put(self, key: str, array: np.ndarray, metadata: dict | None = None) -> Path | None:
        """Store ``array`` under ``key``; a cache that cannot be written is skipped silently.

        Parameters
        ----------
        key : str
            Lowercase hexadecimal digest.
        array : ndarray
            The embeddings (stored contiguous, dtype kept).
        metadata : dict or None, default=None
            Stored in the file's header, values converted to strings (what computed it).

        Returns
        -------
        Path or None
            The file written, or None when the folder is not writable.

        Raises
        ------
        ValueError
            ``key`` is not a lowercase hexadecimal digest (see :meth:`path`).
        """
        from safetensors.numpy import save_file

        path = self.path(key)
        tmp = path.with_name(f".{os.getpid()}.{path.name}")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            save_file({"embedding": np.ascontiguousarray(array)}, str(tmp),
                      metadata={k: str(v) for k, v in (metadata or {}).items()})
            os.replace(tmp, path)
        except OSError:
            # a read-only or full disk: no half-written file is left behind, and a cache
            # that cannot be written still works, only slower
            try:
                tmp.unlink(missing_ok=True)
            except OSError:
                pass
            return None
        return path

    def __len__(self) -> int:
        return sum(1 for _ in self.root.glob("*/*.safetensors")) if self.root.exists() else 0
