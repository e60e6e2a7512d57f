"""Real FID/KID features: the TensorFlow-compatible Inception-v3 of FID, loaded from the user's file.

FID is defined by one network: the 2015-12-05 TensorFlow Inception-v3, distributed for PyTorch as
``pt_inception-2015-12-05-6726825d.pth`` (pytorch-fid's release; torch-fidelity ships the same
file as weights-inception-2015-12-05-6726825d.pth). Nothing is downloaded: the user passes the
path, and the file must be that one (its SHA-256 starts with 6726825d, the torch.hub convention
for the name). Any other network would not be FID, so there is no fallback.

The architecture and the TF1-exact bilinear resize follow torch-fidelity's
``feature_extractor_inceptionv3.py`` and ``interpolate_compat_tensorflow.py`` (Apache-2.0; itself
adapted from mseitzer/pytorch-fid), with the same module names, so the file loads strictly.
torch-fidelity itself is not used because it imports torchvision at import time, which needs a
torchvision build matching the installed torch.

Input: uint8 images (N, 3, H, W); the output is the 2048-d pool feature used by FID and KID.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["InceptionV3FID", "load_fid_inception", "inception_features", "FID_WEIGHTS_NAME", "FID_SHA256_PREFIX",
           "FIDWeightsError"]

FID_WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
FID_SHA256_PREFIX = "6726825d"
INPUT_SIZE = 299


class FIDWeightsError(ValueError):
    """The Inception weights are missing or are not the FID file; the message says what to pass."""


class BasicConv2d(nn.Module):
    def __init__(self, c_in, c_out, **kwargs):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, bias=False, **kwargs)
        self.bn = nn.BatchNorm2d(c_out, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _tf_avg_pool(x):
    # TensorFlow's average pool does not count the zero padding.
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    def __init__(self, c_in, pool_features):
        super().__init__()
        self.branch1x1 = BasicConv2d(c_in, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(c_in, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(c_in, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(c_in, pool_features, kernel_size=1)

    def forward(self, x):
        return torch.cat([
            self.branch1x1(x),
            self.branch5x5_2(self.branch5x5_1(x)),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            self.branch_pool(_tf_avg_pool(x)),
        ], 1)


class InceptionB(nn.Module):
    def __init__(self, c_in):
        super().__init__()
        self.branch3x3 = BasicConv2d(c_in, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(c_in, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x):
        return torch.cat([
            self.branch3x3(x),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            F.max_pool2d(x, kernel_size=3, stride=2),
        ], 1)


class InceptionC(nn.Module):
    def __init__(self, c_in, channels_7x7):
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(c_in, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(c_in, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(c_in, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(c_in, 192, kernel_size=1)

    def forward(self, x):
        dbl = x
        for k in range(1, 6):
            dbl = getattr(self, f"branch7x7dbl_{k}")(dbl)
        return torch.cat([
            self.branch1x1(x),
            self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x))),
            dbl,
            self.branch_pool(_tf_avg_pool(x)),
        ], 1)


class InceptionD(nn.Module):
    def __init__(self, c_in):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(c_in, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(c_in, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x):
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionE(nn.Module):
    """Mixed_7b pools by average (without padding), Mixed_7c by max: as in the TF graph."""

    def __init__(self, c_in, pool: str):
        super().__init__()
        self.pool = pool
        self.branch1x1 = BasicConv2d(c_in, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(c_in, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(c_in, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(c_in, 192, kernel_size=1)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = _tf_avg_pool(x) if self.pool == "avg" else F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        return torch.cat([
            self.branch1x1(x),
            torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1),
            torch.cat([self.branch3x3dbl_3a(dbl), self.branch3x3dbl_3b(dbl)], 1),
            self.branch_pool(pooled),
        ], 1)


def tf1_bilinear_resize(x, size: int):
    """Bilinear resize exactly as TensorFlow 1.x (align_corners=False, no half-pixel offset)."""
    def axis(n_in):
        pos = torch.arange(size, dtype=x.dtype, device=x.device) * torch.tensor(n_in / size, dtype=torch.float32)
        lo = pos.long()
        return lo, (lo + 1).clamp_max(n_in - 1), pos - lo.float()

    ylo, yhi, dy = axis(x.shape[2])
    xlo, xhi, dx = axis(x.shape[3])
    top, bottom = x[:, :, ylo, :], x[:, :, yhi, :]
    row0 = top[:, :, :, xlo] + (top[:, :, :, xhi] - top[:, :, :, xlo]) * dx.view(1, 1, 1, -1)
    row1 = bottom[:, :, :, xlo] + (bottom[:, :, :, xhi] - bottom[:, :, :, xlo]) * dx.view(1, 1, 1, -1)
    return row0 + (row1 - row0) * dy.view(1, 1, -1, 1)


class InceptionV3FID(nn.Module):
    """The FID Inception-v3 up to its 2048-d average pool (fc kept so the file loads strictly)."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, pool="avg")
        self.Mixed_7c = InceptionE(2048, pool="max")
        self.fc = nn.Linear(2048, 1008)

    def forward(self, images_uint8):
        if images_uint8.dtype != torch.uint8 or images_uint8.dim() != 4 or images_uint8.shape[1] != 3:
            raise ValueError(f"expected uint8 images (N, 3, H, W), got {images_uint8.dtype} "
                             f"{tuple(images_uint8.shape)}")
        x = tf1_bilinear_resize(images_uint8.float(), INPUT_SIZE)
        x = (x - 128) / 128
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, f"Mixed_{name}")(x)
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_state(net: InceptionV3FID, state: dict, source: str) -> None:
    """Load a state dict strictly: every key present, every shape equal."""
    expected = net.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    bad = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or bad:
        raise FIDWeightsError(f"{source}: not the FID Inception-v3 state dict (missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]}, wrong shapes {bad[:3]})")
    net.load_state_dict(state)


def load_fid_inception(path, device="cpu") -> InceptionV3FID:
    """The FID network from the user's pt_inception-2015-12-05-6726825d.pth (checked by SHA-256)."""
    if path is None:
        raise FIDWeightsError(f"FID/KID need the Inception-v3 weights {FID_WEIGHTS_NAME} (pytorch-fid release); "
                              "download it yourself and pass --fid-weights PATH")
    path = Path(path)
    if not path.is_file():
        raise FIDWeightsError(f"{path}: no such file; --fid-weights must be the path of {FID_WEIGHTS_NAME}")
    digest = _sha256(path)
    if not digest.startswith(FID_SHA256_PREFIX):
        raise FIDWeightsError(f"{path} is not {FID_WEIGHTS_NAME}: its SHA-256 starts with {digest[:8]}, the FID "
                              f"weights' with {FID_SHA256_PREFIX}; no other network gives FID")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any failure means an unusable file
        raise FIDWeightsError(f"{path}: cannot read the Inception weights ({err})") from err
    net = InceptionV3FID()
    load_state(net, state, str(path))
    return net.to(device).eval()


@torch.no_grad()
def inception_features(net: InceptionV3FID, images, batch_size: int = 50) -> np.ndarray:
    """2048-d features (N, 2048) float64 of images (N, H, W, C) in [0, 1], C = 1 (repeated) or 3."""
    images = np.asarray(images, dtype=np.float32)
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"expected images (N, H, W, 1 or 3) in [0, 1], got shape {images.shape}")
    device = next(net.parameters()).device
    out = []
    for lo in range(0, len(images), batch_size):
        batch = np.round(np.clip(images[lo:lo + batch_size], 0.0, 1.0) * 255.0).astype(np.uint8)
        x = torch.from_numpy(batch).permute(0, 3, 1, 2).to(device)
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        out.append(net(x).double().cpu().numpy())
    return np.concatenate(out)
