"""The FID Inception-v3 port (hold_export.fid_inception): file checks, strict loading, the TF1
resize, and (where torch-fidelity imports) bit-parity with torch-fidelity's network. The real
weights are not available here, so no FID value is claimed or checked."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from hold_export.fid_inception import (FID_WEIGHTS_NAME, FIDWeightsError, InceptionV3FID,  # noqa: E402
                                       inception_features, load_fid_inception, load_state, tf1_bilinear_resize)


def test_missing_weights_say_what_to_pass(tmp_path):
    with pytest.raises(FIDWeightsError, match="--fid-weights"):
        load_fid_inception(None)
    with pytest.raises(FIDWeightsError, match="no such file"):
        load_fid_inception(tmp_path / FID_WEIGHTS_NAME)


def test_a_file_with_another_hash_is_refused(tmp_path):
    """Even a valid state dict of the right architecture is not FID unless it is the exact file."""
    fake = tmp_path / FID_WEIGHTS_NAME
    torch.save(InceptionV3FID().state_dict(), fake)
    with pytest.raises(FIDWeightsError, match="SHA-256 starts with"):
        load_fid_inception(fake)


def test_state_dict_is_loaded_strictly():
    net = InceptionV3FID()
    state = net.state_dict()
    load_state(InceptionV3FID(), state, "ok")  # the architecture's own keys load
    missing = {k: v for k, v in state.items() if not k.startswith("Mixed_7c")}
    with pytest.raises(FIDWeightsError, match="missing"):
        load_state(InceptionV3FID(), missing, "bad")
    wrong = dict(state, **{"fc.weight": torch.zeros(10, 2048)})
    with pytest.raises(FIDWeightsError, match="wrong shapes"):
        load_state(InceptionV3FID(), wrong, "bad")


def tf1_resize_reference(img, size):
    """TensorFlow 1.x resize_bilinear (align_corners=False): source = dest * in/out, no offset."""
    h, w = img.shape
    out = np.empty((size, size))
    for i in range(size):
        y = i * h / size
        y0, fy = int(np.floor(y)), y - np.floor(y)
        y1 = min(y0 + 1, h - 1)
        for j in range(size):
            x = j * w / size
            x0, fx = int(np.floor(x)), x - np.floor(x)
            x1 = min(x0 + 1, w - 1)
            top = img[y0, x0] + (img[y0, x1] - img[y0, x0]) * fx
            bottom = img[y1, x0] + (img[y1, x1] - img[y1, x0]) * fx
            out[i, j] = top + (bottom - top) * fy
    return out


def test_tf1_bilinear_resize():
    img = np.random.default_rng(0).random((5, 5)) * 255
    got = tf1_bilinear_resize(torch.tensor(img, dtype=torch.float32)[None, None], 13)[0, 0].numpy()
    np.testing.assert_allclose(got, tf1_resize_reference(img, 13), rtol=1e-5, atol=1e-3)


@pytest.mark.slow
def test_features_of_grey_images():
    net = InceptionV3FID().eval()
    images = np.random.default_rng(1).random((2, 28, 28, 1)).astype(np.float32)
    f = inception_features(net, images)
    assert f.shape == (2, 2048) and np.isfinite(f).all()
    # grey images are repeated to RGB: the same as passing the RGB copy
    np.testing.assert_allclose(inception_features(net, np.repeat(images, 3, axis=-1)), f, rtol=1e-6)


@pytest.mark.slow
def test_matches_torch_fidelity_network(tmp_path):
    """Same random state dict: identical features to torch-fidelity's FeatureExtractorInceptionV3."""
    fidelity = pytest.importorskip("torch_fidelity")
    torch.manual_seed(0)
    net = InceptionV3FID().eval()
    path = tmp_path / "random.pth"
    torch.save(net.state_dict(), path)
    ref = fidelity.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"],
                                               feature_extractor_weights_path=str(path))
    images = torch.from_numpy(np.random.default_rng(2).integers(0, 256, (2, 3, 28, 28), dtype=np.uint8))
    with torch.no_grad():
        (expected,) = ref(images)
        np.testing.assert_allclose(net(images).numpy(), expected.numpy(), rtol=1e-5, atol=1e-6)
