"""Tests for drifttutor.corruptions: contracts, the blur's maths, reproducibility and errors."""

from __future__ import annotations

import colorsys
import pickle

import numpy as np
import pytest
import torch
from scipy import ndimage
from torch.utils.data import DataLoader, TensorDataset

from drifttutor import corruptions as C

ALL = C.list_corruptions()
RANDOMISED = ["gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise"]
DETERMINISTIC = [name for name in ALL if name not in RANDOMISED]


def images_like(shape=(2, 3, 40, 48), *, dtype=torch.float32, seed=0) -> torch.Tensor:
    """A seeded batch in [0, 1] with a smooth part, fine texture, and exact 0s and 1s."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(shape, generator=generator, dtype=torch.float64)
    ramp = torch.linspace(0, 1, shape[-1], dtype=torch.float64)
    images = 0.5 * images + 0.5 * ramp
    images[:, :, 0, 0], images[:, :, -1, -1] = 0.0, 1.0
    return images.to(dtype)


def smooth_images(side, *, seed=0) -> torch.Tensor:
    """A seeded photo-like batch: coarse random blobs enlarged smoothly (bicubic)."""
    coarse = images_like((2, 3, max(side // 8, 2), max(side // 8, 2)), seed=seed)
    return torch.nn.functional.interpolate(coarse, size=(side, side), mode="bicubic").clamp(0, 1)


def call(name, images, severity, seed=None):
    function = C.get_corruption(name)
    if seed is not None:
        return function(images, severity, generator=torch.Generator().manual_seed(seed))
    return function(images, severity)


def test_registry_lists_the_required_corruptions():
    assert ALL == list(C.CORRUPTIONS)
    required = {"gaussian_blur", "brightness", "contrast", "pixelate", "jpeg_compression"}
    assert set(ALL) >= set(RANDOMISED) | required
    assert [name for name in ALL if C.is_randomised(name)] == RANDOMISED


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", ALL)
def test_every_severity_keeps_shape_dtype_device_and_range(name, dtype):
    images = images_like(dtype=dtype)
    for severity in C.SEVERITIES:
        out = call(name, images, severity, seed=1 if name in RANDOMISED else None)
        assert out.shape == images.shape and out.dtype == dtype and out.device == images.device
        assert out.min() >= 0 and out.max() <= 1
        assert not torch.equal(out, images), f"{name} at severity {severity} changed nothing"


@pytest.mark.parametrize("name", ALL)
def test_single_channel_and_tiny_images_work(name):
    for shape in [(1, 1, 5, 7), (3, 3, 1, 1), (0, 3, 8, 8)]:
        images = images_like(shape) if shape[0] else torch.zeros(shape)
        assert call(name, images, 5).shape == shape


def test_parameters_match_the_tables_at_32_and_224_px_and_interpolate_between():
    assert [C.gaussian_blur_sigma(s, 224) for s in C.SEVERITIES] == [1, 2, 3, 4, 6]
    assert [C.gaussian_blur_sigma(s, 32) for s in C.SEVERITIES] == [0.4, 0.6, 0.7, 0.8, 1.0]
    assert C.gaussian_blur_sigma(5, 16) == 1.0 and C.gaussian_blur_sigma(5, 512) == 6.0
    assert C.gaussian_blur_sigma(5, 128) == pytest.approx((1.0 + 6.0) / 2)
    assert C.corruption_parameter("jpeg_compression", 1, 224) == 25


@pytest.mark.parametrize("size", [(32, 32), (224, 224), (6, 9)])
def test_blur_keeps_a_constant_image_constant(size):
    images = torch.full((1, 3, *size), 0.7)
    for severity in C.SEVERITIES:
        torch.testing.assert_close(C.gaussian_blur(images, severity), images, atol=1e-6, rtol=0)


@pytest.mark.parametrize("size", [(40, 48), (224, 224), (5, 30)])
def test_blur_equals_scipy_gaussian_filter_in_mirror_mode(size):
    # scipy "mirror" (d c b | a b c d) is torch "reflect"; scipy "reflect" would repeat the edge pixel.
    images = images_like((1, 2, *size), dtype=torch.float64)
    for severity in C.SEVERITIES:
        sigma = C.gaussian_blur_sigma(severity, min(size))
        expected = ndimage.gaussian_filter(images.numpy(), sigma, mode="mirror", truncate=4.0, axes=(2, 3))
        np.testing.assert_allclose(C.gaussian_blur(images, severity).numpy(), expected, atol=1e-10)


def test_blur_handles_a_kernel_wider_than_the_image():
    images = images_like((1, 1, 3, 224))  # sigma 1 reaches 4 px, beyond the 3 rows
    sigma = C.gaussian_blur_sigma(5, 3)
    expected = ndimage.gaussian_filter(images.double().numpy(), sigma, mode="mirror", axes=(2, 3))
    np.testing.assert_allclose(C.gaussian_blur(images, 5).double().numpy(), expected, atol=1e-5)


def laplacian_energy(images: torch.Tensor) -> float:
    kernel = torch.tensor([[0.0, 1, 0], [1, -4, 1], [0, 1, 0]]).expand(images.shape[1], 1, 3, 3)
    return float(torch.nn.functional.conv2d(images, kernel, groups=images.shape[1]).square().mean())


@pytest.mark.parametrize("side", [32, 224])
def test_blur_removes_more_fine_detail_at_each_severity(side):
    images = images_like((2, 3, side, side))
    blurred = [C.gaussian_blur(images, severity) for severity in C.SEVERITIES]
    energies = [laplacian_energy(out) for out in [images, *blurred]]
    assert all(a > b for a, b in zip(energies, energies[1:])), energies


@pytest.mark.parametrize("name", RANDOMISED)
def test_same_seed_same_noise_different_seed_different_noise(name):
    images = images_like()
    assert torch.equal(call(name, images, 3, seed=5), call(name, images, 3, seed=5))
    assert not torch.equal(call(name, images, 3, seed=5), call(name, images, 3, seed=6))


# Pixelate at 32 px is left out: shrinking to 30, ..., 20 px moves blocks by uneven sub-pixel
# amounts, and that shift, not the coarseness, dominates the pixel change; see the resolution test.
@pytest.mark.parametrize(
    "name, side", [(name, side) for name in ALL for side in (32, 224) if (name, side) != ("pixelate", 32)]
)
def test_higher_severity_changes_images_more(name, side):
    images = smooth_images(side)
    seed = 0 if name in RANDOMISED else None
    changes = [float((call(name, images, s, seed) - images).abs().mean()) for s in C.SEVERITIES]
    assert all(a < b for a, b in zip(changes, changes[1:])), changes


@pytest.mark.parametrize("side", [32, 224])
def test_pixelate_lowers_the_resolution_at_each_severity(side):
    images = images_like((1, 3, side, side))
    distinct_rows = [int((out[0, :, 1:] != out[0, :, :-1]).any(dim=-1).any(dim=0).sum()) + 1
                     for out in (C.pixelate(images, s) for s in C.SEVERITIES)]
    factors = [C.corruption_parameter("pixelate", s, side) for s in C.SEVERITIES]
    assert distinct_rows == [int(side * factor) for factor in factors], distinct_rows


def test_brightness_equals_adding_to_the_hsv_value():
    images = images_like((1, 3, 4, 5), dtype=torch.float64)
    images[0, :, 1, 1] = 0.0  # a black pixel has no hue: it turns grey
    out = C.brightness(images, 3)
    amount = C.corruption_parameter("brightness", 3, 4)
    for row in range(4):
        for column in range(5):
            h, s, v = colorsys.rgb_to_hsv(*images[0, :, row, column].tolist())
            expected = colorsys.hsv_to_rgb(h, s, min(v + amount, 1.0))
            np.testing.assert_allclose(out[0, :, row, column].numpy(), expected, atol=1e-12)


def test_contrast_keeps_each_channel_mean_when_nothing_clips():
    images = 0.25 + 0.5 * images_like()
    torch.testing.assert_close(C.contrast(images, 4).mean(dim=(2, 3)), images.mean(dim=(2, 3)))


def test_pixelate_makes_blocks_and_jpeg_quantises():
    out = C.pixelate(images_like((1, 3, 224, 224)), 5)  # 56 px blown up by 4
    assert torch.equal(out[..., ::4, ::4].repeat_interleave(4, -1).repeat_interleave(4, -2), out)
    out = C.jpeg_compression(images_like(), 3)
    torch.testing.assert_close(out * 255, (out * 255).round())


BAD_INPUTS = [
    (lambda: C.gaussian_blur(images_like(), 0), "severity must be an int from 1"),
    (lambda: C.gaussian_blur(images_like(), 6), "severity must be an int from 1"),
    (lambda: C.gaussian_noise(images_like(), 2.0), "severity must be an int from 1"),
    (lambda: C.contrast(images_like(), True), "severity must be an int from 1"),
    (lambda: C.gaussian_blur(images_like()[0]), "4 dimensions"),
    (lambda: C.brightness(images_like() * 2), r"values in \[0, 1\]"),
    (lambda: C.brightness(images_like() - 0.5), r"values in \[0, 1\]"),
    (lambda: C.pixelate((images_like() * 255).to(torch.uint8)), "floating-point"),
    (lambda: C.shot_noise(images_like().numpy()), "torch.Tensor"),
    (lambda: C.get_corruption("fog"), "unknown corruption 'fog'; choose one of: gaussian_noise"),
    (lambda: C.make_corruption("blur", 1), "unknown corruption"),
    (lambda: C.make_corruption("contrast", 9), "severity must be an int from 1"),
    (lambda: C.make_corruption("contrast", 1, generator=torch.Generator()), "takes no generator"),
    (lambda: C.Corruption("gaussian_noise", 1, seed=0.5), "seed must be an int"),
    (lambda: C.gaussian_blur_sigma(1, 0), "image_size must be a positive int"),
    (lambda: C.jpeg_compression(images_like((1, 4, 8, 8))), "1 \\(grey\\) or 3 \\(RGB\\) channels"),
]


@pytest.mark.parametrize("make_error, message", BAD_INPUTS)
def test_bad_input_raises_a_helpful_value_error(make_error, message):
    with pytest.raises(ValueError, match=message):
        make_error()


@pytest.mark.parametrize("name", ["shot_noise", "contrast"])
def test_make_corruption_and_corruption_module_pickle(name):
    images = images_like()
    generator = torch.Generator().manual_seed(2) if name in RANDOMISED else None
    function = C.make_corruption(name, 4, generator=generator)
    assert torch.equal(pickle.loads(pickle.dumps(function))(images), function(images))
    module = C.Corruption(name, 4, seed=2)
    copy = pickle.loads(pickle.dumps(module))
    assert torch.equal(copy(images), module(images))
    assert torch.equal(copy(images), module(images))  # both streams advance alike
    plain = call(name, images, 4, seed=2 if name in RANDOMISED else None)
    assert torch.equal(C.Corruption(name, 4, seed=2)(images), plain)
    assert "severity=4" in repr(module)


class CorruptingCollate:
    """A collate step as the data module would write it: stack, then corrupt."""

    def __init__(self, corruption):
        self.corruption = corruption

    def __call__(self, batch):
        return self.corruption(torch.stack([images for (images,) in batch]))


def test_corruption_module_gives_each_dataloader_worker_its_own_reproducible_noise():
    images = images_like((1, 3, 16, 16)).expand(4, 3, 16, 16).contiguous()  # four identical images

    def run():
        collate = CorruptingCollate(C.Corruption("gaussian_noise", 3, seed=7))
        loader = DataLoader(TensorDataset(images), batch_size=1, num_workers=2,
                            multiprocessing_context="fork", collate_fn=collate)
        return list(loader)

    first, second = run(), run()
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert not torch.equal(first[0], first[1]), "workers 0 and 1 drew the same noise"


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", DETERMINISTIC)
def test_cuda_and_cpu_agree(name):
    for dtype, atol in [(torch.float64, 1e-6), (torch.float32, 2e-3)]:  # float32 convs may use TF32
        images = images_like((2, 3, 64, 64), dtype=dtype)
        for severity in C.SEVERITIES:
            out = call(name, images.cuda(), severity)
            assert out.device.type == "cuda"
            torch.testing.assert_close(out.cpu(), call(name, images, severity), atol=atol, rtol=0)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", RANDOMISED)
def test_cuda_randomised_corruptions_with_cpu_and_cuda_generators(name):
    images = images_like().cuda()
    for device in ["cpu", "cuda"]:
        first = call_on(name, images, device)
        assert first.device.type == "cuda" and torch.equal(first, call_on(name, images, device))
    assert torch.equal(C.Corruption(name, 3, seed=1)(images), C.Corruption(name, 3, seed=1)(images))
    # A CPU generator draws the same numbers whichever device the images are on.
    torch.testing.assert_close(call(name, images, 3, seed=4).cpu(), call(name, images.cpu(), 3, seed=4))


def call_on(name, images, device):
    return C.get_corruption(name)(images, 3, generator=torch.Generator(device=device).manual_seed(4))
