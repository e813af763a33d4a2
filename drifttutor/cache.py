"""A cache folder for what one notebook makes and later notebooks reuse (trained heads, features).

Each notebook must run on its own from a fresh kernel, yet only one of them should pay for
training or for extracting features. Every cache file name carries a fingerprint of the code
that produced it, so nothing stale is ever loaded after that code changed.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Callable

import torch

from . import __version__

CACHE_ENV_VAR = "DRIFTTUTOR_CACHE"
_FINGERPRINTED = ("data.py", "models.py", "training.py", "fitting.py")


def resolve_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where cached artifacts live: the argument, ``$DRIFTTUTOR_CACHE``, or ``~/.cache/drifttutor``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    return Path(os.environ.get(CACHE_ENV_VAR) or Path.home() / ".cache" / "drifttutor").expanduser()


def code_fingerprint() -> str:
    """A short hash of the package version and of the code that defines data, model and features."""
    digest = hashlib.sha256(__version__.encode())
    for module in _FINGERPRINTED:
        path = Path(__file__).parent / module
        if path.exists():
            digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def cache_path(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """The file for artifact ``name`` (a short descriptive string) under the cache folder."""
    return resolve_cache_dir(cache_dir) / f"{name}-{code_fingerprint()}.pt"


def load_or_compute_tensor(
    name: str, compute: Callable[[], torch.Tensor], *, cache_dir: str | os.PathLike | None = None
) -> torch.Tensor:
    """Load tensor ``name`` from the cache, or ``compute()`` it and save it there (on the CPU)."""
    path = cache_path(name, cache_dir)
    if path.exists():
        return torch.load(path, map_location="cpu", weights_only=True)
    tensor = compute().detach().cpu()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(tensor, path)
    return tensor
