"""Small helpers that turn misuse into readable errors.

Every public function of drifttutor validates its inputs with :func:`check`, so a learner sees
what was wrong and what to do, instead of a traceback from deep inside torch.
"""

from __future__ import annotations

import torch


def check(condition: bool, message: str, error: type[Exception] = ValueError) -> None:
    """Raise ``error(message)`` unless ``condition`` holds."""
    if not condition:
        raise error(message)


def check_image_batch(images: object, *, name: str = "images") -> torch.Tensor:
    """Check that ``images`` is a float tensor of shape (N, C, H, W) with values in [0, 1].

    drifttutor keeps images un-normalised until they reach the model, so that corruptions can be
    applied to raw pixels; this check catches the usual slips (a single image without the batch
    dimension, uint8 pixels, an already-normalised batch).
    """
    check(
        isinstance(images, torch.Tensor),
        f"{name} must be a torch.Tensor of shape (N, C, H, W), got {type(images).__name__}.",
    )
    assert isinstance(images, torch.Tensor)
    check(
        images.dim() == 4,
        f"{name} must have 4 dimensions (N, C, H, W), got shape {tuple(images.shape)}; "
        "for a single image use images.unsqueeze(0).",
    )
    check(
        images.is_floating_point(),
        f"{name} must be a floating-point tensor with values in [0, 1], got dtype {images.dtype}; "
        "convert uint8 pixels with images.float() / 255.",
    )
    if images.numel():
        lo, hi = float(images.min()), float(images.max())
        check(
            lo >= 0.0 and hi <= 1.0 and lo == lo and hi == hi,
            f"{name} must hold values in [0, 1] (un-normalised pixels), got range [{lo:.3g}, {hi:.3g}]; "
            "do not normalise images before passing them in: drifttutor models normalise inside forward().",
        )
    return images
