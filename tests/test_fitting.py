"""The fitting helper: extract features from a dataloader and fit reducers and detectors."""

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from drifttutor.detectors import KernelMMDDriftDetector, KSDriftDetector, PCAReducer
from drifttutor.fitting import extract_features, fit, fit_chain


def tiny_loader(n=40, batch_size=8, labels=True):
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(n, 3, 8, 8, generator=generator)
    if labels:
        dataset = TensorDataset(images, torch.arange(n) % 3)
        return DataLoader(dataset, batch_size=batch_size)
    return DataLoader(images, batch_size=batch_size)  # batches are plain tensors


def tiny_extractor():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Dropout(0.5),
    )


def test_fit_returns_reference_features_and_fits_a_pca_ks_chain():
    extractor = tiny_extractor()
    chain = nn.Sequential(PCAReducer(2), KSDriftDetector())
    reference_features = fit(tiny_loader(), extractor, chain, progress=False)
    assert reference_features.shape == (40, 4)
    assert not reference_features.requires_grad and not reference_features.is_inference()
    assert chain[0].is_fitted and chain[1].is_fitted
    assert torch.equal(chain[1].base_outputs, chain[0](reference_features))
    # eval mode: running the extractor again gives the same features (dropout off, BN frozen)
    assert extractor.training
    with torch.no_grad():
        assert torch.allclose(
            extractor.eval()(next(iter(tiny_loader()))[0]), reference_features[:8]
        )
    assert float(chain[1].compute_p_value(chain[0](reference_features[:20]))) > 0.05


def test_fit_accepts_a_single_detector_and_a_list():
    mmd, ks = KernelMMDDriftDetector(n_perm=50, seed=0), KSDriftDetector()
    reference_features = fit(tiny_loader(labels=False), tiny_extractor(), [mmd, ks], progress=False)
    assert torch.equal(mmd.base_outputs, reference_features)
    assert torch.equal(ks.base_outputs, reference_features)
    alone = KSDriftDetector()
    fit(tiny_loader(), tiny_extractor(), alone, num_batches=2, progress=False)
    assert alone.base_outputs.shape == (16, 4)


def test_extract_features_options():
    features, labels = extract_features(
        tiny_loader(), tiny_extractor(), num_batches=3, return_labels=True, progress=True
    )
    assert features.shape == (24, 4) and torch.equal(labels, torch.arange(24) % 3)
    with pytest.raises(ValueError, match="needs \\(images, labels\\) batches"):
        extract_features(
            tiny_loader(labels=False), tiny_extractor(), return_labels=True, progress=False
        )
    with pytest.raises(ValueError, match="nn.Flatten"):
        extract_features(tiny_loader(), nn.Conv2d(3, 2, 3), progress=False)
    with pytest.raises(ValueError, match="tensor of images or an \\(images, labels\\) tuple"):
        extract_features([{"image": torch.rand(2, 3, 8, 8)}], tiny_extractor(), progress=False)
    with pytest.raises(ValueError, match="no batches"):
        extract_features([], tiny_extractor(), progress=False)


def test_fit_chain_feeds_reducer_outputs_forward():
    reference_features = torch.randn(30, 6, generator=torch.Generator().manual_seed(1))
    pca, mmd, ks = PCAReducer(2), KernelMMDDriftDetector(n_perm=50), KSDriftDetector()
    fit_chain(reference_features, nn.Sequential(pca, mmd, ks))
    assert mmd.base_outputs.shape == ks.base_outputs.shape == (30, 2)
    with pytest.raises(ValueError, match="empty"):
        fit_chain(reference_features, [])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fit_moves_batches_to_the_extractor_device():
    extractor = tiny_extractor().cuda()
    detector = KSDriftDetector().cuda()
    reference_features = fit(tiny_loader(), extractor, detector, progress=False)
    assert reference_features.device.type == "cpu"
    assert detector.base_outputs.device.type == "cuda"
