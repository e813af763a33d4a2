"""Corruptions: simulated input drift for image batches.

A corruption changes how images look without changing what they show: a lens losing focus
(:func:`gaussian_blur`), sensor noise (:func:`gaussian_noise`, :func:`shot_noise`,
:func:`impulse_noise`, :func:`speckle_noise`), a different exposure or screen
(:func:`brightness`, :func:`contrast`) or a cheaper pipeline (:func:`pixelate`,
:func:`jpeg_compression`). Applying one to held-out images gives drifted data with a known cause
and a dial, ``severity`` from 1 (mild) to 5 (severe), so a detector's score can be watched as the
drift grows.

The corruptions and their parameter tables follow ImageNet-C and CIFAR-10-C: Hendrycks &
Dietterich, "Benchmarking Neural Network Robustness to Common Corruptions and Perturbations",
ICLR 2019 (https://github.com/hendrycks/robustness). Those tables were tuned for 32 px (CIFAR)
and 224 px (ImageNet) images; here each parameter is interpolated linearly in the shorter image
side between the two tables and clamped outside [32, 224] px (see :func:`corruption_parameter`).

Every corruption takes a float batch (N, C, H, W) in [0, 1] on any device and returns a batch of
the same shape, dtype and device, still in [0, 1]. Randomised ones take ``generator`` for
reproducible noise. Pick them by name with :func:`get_corruption` or :func:`make_corruption`, or
wrap one in :class:`Corruption` to use it inside a DataLoader.
"""

from __future__ import annotations

import functools
import inspect
import io
import numbers
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import get_worker_info

from drifttutor._checks import check, check_image_batch

SEVERITIES = (1, 2, 3, 4, 5)
_CIFAR_SIDE, _IMAGENET_SIDE = 32, 224

# name: (CIFAR-10-C table at 32 px, ImageNet-C table at 224 px), one value per severity 1-5.
_TABLES: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "gaussian_noise": ((0.04, 0.06, 0.08, 0.09, 0.10), (0.08, 0.12, 0.18, 0.26, 0.38)),
    "shot_noise": ((500, 250, 100, 75, 50), (60, 25, 12, 5, 3)),
    "impulse_noise": ((0.01, 0.02, 0.03, 0.05, 0.07), (0.03, 0.06, 0.09, 0.17, 0.27)),
    "speckle_noise": ((0.06, 0.10, 0.12, 0.16, 0.20), (0.15, 0.20, 0.35, 0.45, 0.60)),
    "gaussian_blur": ((0.4, 0.6, 0.7, 0.8, 1.0), (1, 2, 3, 4, 6)),
    "brightness": ((0.05, 0.10, 0.15, 0.20, 0.30), (0.1, 0.2, 0.3, 0.4, 0.5)),
    "contrast": ((0.75, 0.50, 0.40, 0.30, 0.15), (0.40, 0.30, 0.20, 0.10, 0.05)),
    "pixelate": ((0.95, 0.90, 0.85, 0.75, 0.65), (0.60, 0.50, 0.40, 0.30, 0.25)),
    "jpeg_compression": ((80, 65, 58, 50, 40), (25, 18, 15, 10, 7)),
}


def _check_severity(severity: object) -> int:
    is_int = isinstance(severity, numbers.Integral) and not isinstance(severity, bool)
    message = f"severity must be an int from 1 (mild) to 5 (severe), got {severity!r}."
    check(is_int and severity in SEVERITIES, message)
    return int(severity)  # type: ignore[arg-type]


def _check_name(name: object) -> str:
    check(name in _TABLES, f"unknown corruption {name!r}; choose one of: {', '.join(_TABLES)}.")
    return str(name)


def corruption_parameter(name: str, severity: int, image_size: int) -> float:
    """The parameter ``name`` uses at ``severity`` on images whose shorter side is ``image_size``.

    With t = clamp((image_size - 32) / (224 - 32), 0, 1), the parameter is
    ``cifar + t * (imagenet - cifar)`` for that severity's entries in the CIFAR-10-C and
    ImageNet-C tables, so a 32 px image gets the CIFAR value and a 224 px one the ImageNet value.
    The interpolation is this package's choice, not the paper's (it made a separate table for
    64 px Tiny ImageNet); it keeps severity 3 "about as bad" at any size.
    """
    small, large = _TABLES[_check_name(name)]
    index = _check_severity(severity) - 1
    check(
        isinstance(image_size, numbers.Integral) and image_size > 0,
        f"image_size must be a positive int (pixels), got {image_size!r}.",
    )
    t = min(max((image_size - _CIFAR_SIDE) / (_IMAGENET_SIDE - _CIFAR_SIDE), 0.0), 1.0)
    return small[index] + t * (large[index] - small[index])


def gaussian_blur_sigma(severity: int, image_size: int) -> float:
    """The standard deviation in pixels that :func:`gaussian_blur` uses (1, 2, 3, 4, 6 at 224 px)."""
    return corruption_parameter("gaussian_blur", severity, image_size)


def _prepare(images: Tensor, name: str, severity: int) -> tuple[Tensor, float]:
    """Check the inputs of corruption ``name``; return the images and the parameter to use."""
    images = check_image_batch(images)
    side = max(1, min(images.shape[-2:]))
    return images, corruption_parameter(name, severity, side)


def _mirror_index(size: int, radius: int, device: torch.device) -> Tensor:
    """Indices that pad a line of ``size`` pixels by ``radius`` on each side, mirrored (d c b | a b c d).

    The mirror repeats as often as needed, so unlike F.pad(mode="reflect") any radius works,
    even one larger than the image; it equals scipy.ndimage's mode="mirror".
    """
    index = torch.arange(-radius, size + radius, device=device)
    if size == 1:
        return torch.zeros_like(index)
    period = 2 * (size - 1)
    index = index.remainder(period)
    return torch.where(index >= size, period - index, index)


def _blur_along(images: Tensor, kernel: Tensor, dim: int) -> Tensor:
    """Convolve every channel of ``images`` with the 1-D ``kernel`` along ``dim`` (2 = H, 3 = W)."""
    radius = kernel.numel() // 2
    padded = images.index_select(dim, _mirror_index(images.shape[dim], radius, images.device))
    channels = images.shape[1]
    shape = (channels, 1, -1, 1) if dim == 2 else (channels, 1, 1, -1)
    weight = kernel.reshape(1, 1, -1).expand(channels, 1, -1).reshape(shape)
    return F.conv2d(padded, weight, groups=channels)


def gaussian_blur(images: Tensor, severity: int = 1) -> Tensor:
    """Blur each channel with a Gaussian, as a lens that has lost focus would.

    The blur is separable (rows, then columns), its kernel reaches 4 sigma on each side (like
    scipy's ``truncate=4.0``), and the image is extended by mirroring before convolving. Padding
    with zeros instead (as TorchDrift's blur does) darkens the image borders, which is a second,
    unasked-for drift; mirroring keeps a constant image constant (ImageNet-C, through
    scikit-image's default, repeated the edge pixel instead, which does too). The result equals
    ``scipy.ndimage.gaussian_filter(..., mode="mirror")`` on the H and W axes. See
    :func:`gaussian_blur_sigma` for the sigma used.
    """
    images, sigma = _prepare(images, "gaussian_blur", severity)
    radius = int(4.0 * sigma + 0.5)
    offsets = torch.arange(-radius, radius + 1, device=images.device, dtype=images.dtype)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = kernel / kernel.sum()
    return _blur_along(_blur_along(images, kernel, 2), kernel, 3).clamp(0, 1)


def _draw_device(images: Tensor, generator: torch.Generator | None) -> torch.device:
    """Random numbers are drawn where the generator lives (a CPU one works for CUDA images too)."""
    return images.device if generator is None else generator.device


def _random_like(images: Tensor, generator: torch.Generator | None, draw=torch.randn) -> Tensor:
    """``draw`` (torch.randn or torch.rand) in the shape and dtype of ``images``, on their device."""
    device = _draw_device(images, generator)
    return draw(images.shape, generator=generator, device=device, dtype=images.dtype).to(images.device)


def gaussian_noise(
    images: Tensor, severity: int = 1, *, generator: torch.Generator | None = None
) -> Tensor:
    """Add zero-mean Gaussian noise to every pixel value, like a sensor's read noise in low light."""
    images, scale = _prepare(images, "gaussian_noise", severity)
    return (images + scale * _random_like(images, generator)).clamp(0, 1)


def shot_noise(
    images: Tensor, severity: int = 1, *, generator: torch.Generator | None = None
) -> Tensor:
    """Replace each value by a Poisson photon count, as few photons reaching a sensor would.

    The table gives photons per unit of brightness; fewer photons (higher severity) mean noisier
    images, and brighter pixels get more noise in absolute terms.
    """
    images, photons = _prepare(images, "shot_noise", severity)
    rate = (images * photons).to(_draw_device(images, generator))
    return (torch.poisson(rate, generator=generator).to(images.device) / photons).clamp(0, 1)


def impulse_noise(
    images: Tensor, severity: int = 1, *, generator: torch.Generator | None = None
) -> Tensor:
    """Set a fraction of the values to 0 or 1 (salt and pepper), like dead or stuck sensor cells.

    Each value (each channel separately, as in ImageNet-C) is hit with the table's probability,
    and a hit is black or white with equal chance.
    """
    images, amount = _prepare(images, "impulse_noise", severity)
    draw = _random_like(images, generator, torch.rand)
    salted = torch.where(draw < amount, torch.ones_like(images), images)
    return torch.where(draw < amount / 2, torch.zeros_like(images), salted)


def speckle_noise(
    images: Tensor, severity: int = 1, *, generator: torch.Generator | None = None
) -> Tensor:
    """Add Gaussian noise proportional to each value (multiplicative), so bright areas get noisier."""
    images, scale = _prepare(images, "speckle_noise", severity)
    return (images + images * scale * _random_like(images, generator)).clamp(0, 1)


def brightness(images: Tensor, severity: int = 1) -> Tensor:
    """Raise the HSV value (the brightest channel) of every pixel, as overexposure would.

    ImageNet-C converts to HSV, adds the table's amount to V (clipped at 1) and converts back.
    Hue and saturation stay, so this equals scaling each pixel's channels by new V / old V, which
    is what is computed here, without a colour-space round trip; a black pixel (V = 0, no hue)
    becomes grey at the new value, as in HSV.
    """
    images, amount = _prepare(images, "brightness", severity)
    value = images.amax(dim=1, keepdim=True)
    brighter = (value + amount).clamp(max=1)
    shares = torch.where(value > 0, images / value.clamp(min=torch.finfo(images.dtype).tiny), 1.0)
    return (shares * brighter).clamp(0, 1)


def contrast(images: Tensor, severity: int = 1) -> Tensor:
    """Pull every value toward its image's channel mean, as a washed-out screen or haze would."""
    images, factor = _prepare(images, "contrast", severity)
    means = images.mean(dim=(2, 3), keepdim=True)
    return ((images - means) * factor + means).clamp(0, 1)


def pixelate(images: Tensor, severity: int = 1) -> Tensor:
    """Average blocks of pixels, then enlarge them back unsmoothed, like a low-resolution camera.

    The table gives the shrink factor of each side (0.25 at 224 px, severity 5). ImageNet-C used
    PIL's BOX filter both ways; here adaptive average pooling and nearest-neighbour upsampling
    play those roles (they differ slightly where the factor does not divide the side).
    """
    images, factor = _prepare(images, "pixelate", severity)
    height, width = images.shape[-2:]
    small = (max(1, int(height * factor)), max(1, int(width * factor)))
    blocks = F.adaptive_avg_pool2d(images, small)
    return F.interpolate(blocks, size=(height, width), mode="nearest-exact")


def _jpeg_round_trip(pixels: np.ndarray, quality: int) -> np.ndarray:
    """Save one uint8 image (H, W, C) as JPEG in memory with Pillow and read it back."""
    buffer = io.BytesIO()
    image = Image.fromarray(pixels.squeeze(-1) if pixels.shape[-1] == 1 else pixels)
    image.save(buffer, "JPEG", quality=quality)
    return np.asarray(Image.open(buffer)).reshape(pixels.shape)


def jpeg_compression(images: Tensor, severity: int = 1) -> Tensor:
    """Save and reload each image as JPEG at the table's quality, as a lossy upload pipeline would.

    Needs 1 or 3 channels. JPEG works on 8-bit pixels, so the batch is rounded to uint8, coded on
    the CPU with Pillow (the encoder ImageNet-C used; torchvision's JPEG functions are deprecated
    since 0.29) and moved back to its device and dtype: values end up multiples of 1/255.
    """
    images, quality = _prepare(images, "jpeg_compression", severity)
    channels = images.shape[1]
    check(channels in (1, 3), f"jpeg_compression needs 1 (grey) or 3 (RGB) channels, got {channels}.")
    if images.shape[0] == 0:
        return images.clone()
    quality = min(max(round(quality), 1), 100)
    pixels = (images * 255).round().to(device="cpu", dtype=torch.uint8).permute(0, 2, 3, 1).numpy()
    decoded = torch.from_numpy(np.stack([_jpeg_round_trip(image, quality) for image in pixels]))
    return decoded.permute(0, 3, 1, 2).to(device=images.device, dtype=images.dtype) / 255


# In ImageNet-C's order: noise, blur, then "digital" corruptions.
CORRUPTIONS: dict[str, Callable[..., Tensor]] = {
    function.__name__: function
    for function in (
        gaussian_noise, shot_noise, impulse_noise, speckle_noise, gaussian_blur,
        brightness, contrast, pixelate, jpeg_compression,
    )
}


def list_corruptions() -> list[str]:
    """Names of the available corruptions, noise first, as in ImageNet-C."""
    return list(CORRUPTIONS)


def get_corruption(name: str) -> Callable[..., Tensor]:
    """The corruption function called ``name`` (see :func:`list_corruptions`)."""
    return CORRUPTIONS[_check_name(name)]


def is_randomised(name: str) -> bool:
    """Whether corruption ``name`` draws random numbers (and so takes a ``generator``)."""
    return "generator" in inspect.signature(get_corruption(name)).parameters


def make_corruption(
    name: str, severity: int, *, generator: torch.Generator | None = None
) -> Callable[[Tensor], Tensor]:
    """A picklable one-argument function ``images -> corrupted images`` for a name and severity.

    The name and severity are checked now, not at the first batch. ``generator`` is only
    accepted by randomised corruptions. In DataLoader worker processes prefer
    :class:`Corruption` with a ``seed``: a pickled generator would give every worker the same noise.
    """
    function = get_corruption(name)
    options = {"severity": _check_severity(severity)}
    if generator is not None:
        check(is_randomised(name), f"{name} is deterministic and takes no generator.")
        options["generator"] = generator
    return functools.partial(function, **options)


_WORKER_SEED_STRIDE = 0x9E3779B97F4A7C15  # a large odd number: worker seeds stay far apart


class Corruption(nn.Module):
    """A named corruption at a fixed severity, as a module: ``Corruption("shot_noise", 3, seed=0)``.

    It can run in a transform or DataLoader collate step, worker processes included: it pickles,
    and it holds a ``seed`` rather than a generator. The generator is made on the first batch's
    device; in DataLoader worker ``k`` it is seeded with a seed derived from ``seed`` and ``k``,
    so workers draw different noise and reruns draw the same. Without a seed, torch's global
    random state is used. Deterministic corruptions ignore the seed.
    """

    def __init__(self, name: str, severity: int, *, seed: int | None = None) -> None:
        super().__init__()
        is_int = isinstance(seed, numbers.Integral) and not isinstance(seed, bool)
        check(seed is None or is_int, f"seed must be an int or None, got {seed!r}.")
        self.function = make_corruption(name, severity)
        self.name, self.severity = name, int(severity)
        self.seed = None if seed is None else int(seed)
        self.randomised = is_randomised(name)
        self._generator: torch.Generator | None = None
        self._generator_key: tuple | None = None

    def _generator_for(self, device: torch.device) -> torch.Generator | None:
        if self.seed is None or not self.randomised:
            return None
        worker = get_worker_info()
        key = (device, None if worker is None else worker.id)
        if self._generator is None or self._generator_key != key:
            seed = self.seed if worker is None else self.seed + _WORKER_SEED_STRIDE * (worker.id + 1)
            self._generator = torch.Generator(device=device).manual_seed(seed % 2**63)
            self._generator_key = key
        return self._generator

    def forward(self, images: Tensor) -> Tensor:
        """Corrupt a batch (N, C, H, W) in [0, 1]."""
        images = check_image_batch(images)
        generator = self._generator_for(images.device)
        return self.function(images) if generator is None else self.function(images, generator=generator)

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state["_generator"], state["_generator_key"] = None, None  # a copy restarts from the seed
        return state

    def extra_repr(self) -> str:
        return f"{self.name!r}, severity={self.severity}, seed={self.seed}"
