"""The torch mirror of the score networks: key/layout map and output parity with MLX (CPU, fp32)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from hold_export.layout import (TO_CHECKPOINT, TO_TORCH, checkpoint_to_torch, conv_weight_keys,  # noqa: E402
                                torch_to_checkpoint)
from hold_export.parity import (mlx_alpha, network_inputs, network_labels, random_checkpoint_tensors,  # noqa: E402
                                torch_alpha)
from hold_export.torch_model import load_weights  # noqa: E402
from hold_export.torch_nets import build_net  # noqa: E402
from hold_mlx.checkpoint import CheckpointError  # noqa: E402
from hold_mlx.netconfig import NetConfig, net_preset  # noqa: E402
from torch_fixtures import one_thread  # noqa: E402,F401

# Attention (at 4x4), GroupNorm, 1x1 skip convs (16 -> 32 channels), down/up sampling, dropout
# (inactive in eval). order 3 x 1 channel = 3 input channels: conv_in's weight is (16, 3, 3, 3) in
# BOTH layouts, so nothing that looks at shapes can tell whether it needs transposing.
UNET = NetConfig(kind="unet", data_channels=1, order=3, image_size=8, channels=16, channel_mult=(1, 2),
                 num_res_blocks=1, attn_resolutions=(4,), groups=4, dropout=0.1)
# 3 colour channels, order 2, a size that halves to odd (12 -> 6 -> 3), attention at two levels.
UNET_RGB = NetConfig(kind="unet", data_channels=3, order=2, image_size=12, channels=16, channel_mult=(1, 2, 2),
                     num_res_blocks=2, attn_resolutions=(6, 3), groups=8, dropout=0.1)
MLP = net_preset("mlp-tiny", data_channels=2, order=3)
# class-conditional: a label embedding (classes + "no label") summed with the time embedding
UNET_COND = NetConfig(**{**UNET.to_dict(), "num_classes": 5})
MLP_COND = net_preset("mlp-tiny", data_channels=2, order=3, num_classes=3)
NETS = [UNET, UNET_RGB, MLP, UNET_COND, MLP_COND]
NET_IDS = ["unet", "unet-rgb", "mlp", "unet-cond", "mlp-cond"]


def _mlx_conv_keys(cfg):
    """Conv weight keys read from the MLX module tree: an independent source for the map."""
    from hold_mlx._mlx import nn
    from hold_mlx.nets import build_net as build_mlx

    return {f"{name}.weight" for name, m in build_mlx(cfg).named_modules() if isinstance(m, nn.Conv2d)}


@pytest.mark.parametrize("cfg", NETS, ids=NET_IDS)
def test_keys_and_conv_keys_agree_with_mlx(cfg):
    from hold_mlx.model import flat_params
    from hold_mlx.nets import build_net as build_mlx

    mlx_params = flat_params(build_mlx(cfg).parameters())
    torch_state = build_net(cfg).state_dict()
    assert set(torch_state) == set(mlx_params)
    keys = conv_weight_keys(build_net(cfg))
    assert keys == _mlx_conv_keys(cfg)
    assert bool(keys) == (cfg.kind == "unet")
    for k, v in mlx_params.items():  # the layout map turns every MLX shape into the torch shape
        expected = tuple(v.shape[i] for i in TO_TORCH) if k in keys else tuple(v.shape)
        assert tuple(torch_state[k].shape) == expected, k


@pytest.mark.parametrize("cfg", NETS, ids=NET_IDS)
def test_layout_round_trip_is_exact(cfg):
    keys = conv_weight_keys(build_net(cfg))
    ckpt = random_checkpoint_tensors(cfg, seed=1)
    there = checkpoint_to_torch(ckpt, keys)
    back = torch_to_checkpoint(there, keys)
    assert set(back) == set(ckpt)
    for k in ckpt:
        assert back[k].dtype == ckpt[k].dtype and np.array_equal(back[k], ckpt[k]), k
    again = checkpoint_to_torch(back, keys)
    assert all(np.array_equal(again[k], there[k]) for k in there)
    assert tuple(TO_TORCH[i] for i in TO_CHECKPOINT) == (0, 1, 2, 3)


def test_layout_is_not_guessed_from_shapes():
    keys = conv_weight_keys(build_net(UNET))
    ckpt = random_checkpoint_tensors(UNET, seed=2)
    square, one_by_one = "conv_in.weight", "down.1.0.skip.weight"
    assert ckpt[square].shape == (16, 3, 3, 3)  # O, kH, kW, I == O, I, kH, kW
    assert ckpt[one_by_one].shape == (32, 1, 1, 16)
    there = checkpoint_to_torch(ckpt, keys)
    assert np.array_equal(there[square], ckpt[square].transpose(0, 3, 1, 2))
    assert not np.array_equal(there[square], ckpt[square])  # same shape, different tensor
    assert there[one_by_one].shape == (32, 16, 1, 1)
    assert "time_in.weight" not in keys and there["time_in.weight"] is ckpt["time_in.weight"]

    # A shape-based guess ("transpose 4-D tensors whose torch-layout shape does not already fit")
    # leaves conv_in alone; the network then disagrees with MLX while the explicit map agrees.
    expected = build_net(UNET).state_dict()
    guessed = {k: (v.transpose(0, 3, 1, 2) if v.ndim == 4 and v.shape != tuple(expected[k].shape) else v)
               for k, v in ckpt.items()}
    u, t = network_inputs(UNET, 2, seed=3)
    ref = mlx_alpha(UNET, ckpt, u, t)
    good = torch_alpha(UNET, ckpt, u, t)
    net = build_net(UNET)
    net.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in guessed.items()})
    with torch.no_grad():
        bad = net.eval()(torch.from_numpy(u).permute(0, 3, 1, 2), torch.from_numpy(t)).permute(0, 2, 3, 1).numpy()
    scale = np.abs(ref).max()
    assert np.abs(good - ref).max() < 1e-5 * scale
    assert np.abs(bad - ref).max() > 1e-2 * scale


def test_unsupported_conv_is_refused():
    net = torch.nn.Sequential(torch.nn.Conv1d(2, 2, 3))
    with pytest.raises(TypeError, match="Conv1d"):
        conv_weight_keys(net)
    with pytest.raises(ValueError, match="4 axes"):
        checkpoint_to_torch({"w": np.zeros((2, 3))}, {"w"})


@pytest.mark.parametrize("cfg", NETS, ids=NET_IDS)
def test_network_outputs_match_mlx(cfg):
    """Same weights, same input (and labels, "no label" among them): fp32 outputs agree to ~1e-5
    relative at several batch sizes."""
    tensors = random_checkpoint_tensors(cfg, seed=4)
    for batch in (1, 3, 8):
        u, t = network_inputs(cfg, batch, seed=10 + batch)
        labels = network_labels(cfg, batch, seed=batch)
        ref = mlx_alpha(cfg, tensors, u, t, labels)
        out = torch_alpha(cfg, tensors, u, t, labels=labels)
        assert out.shape == ref.shape == u.shape[:-1] + (cfg.data_channels,)
        assert np.abs(ref).max() > 0.1  # the random weights reach the output
        assert np.abs(out - ref).max() <= 1e-5 * np.abs(ref).max(), batch


def test_rows_are_independent_of_the_batch():
    """Batch 8 row i equals batch 1 on row i (no cross-talk through norms or attention)."""
    tensors = random_checkpoint_tensors(UNET, seed=5)
    u, t = network_inputs(UNET, 8, seed=6)
    full = torch_alpha(UNET, tensors, u, t)
    single = torch_alpha(UNET, tensors, u[5:6], t[5:6])
    assert np.abs(full[5:6] - single).max() <= 1e-5 * np.abs(full).max()


def test_weights_that_do_not_match_the_config_are_refused():
    tensors = random_checkpoint_tensors(UNET, seed=7)
    wider = NetConfig(**{**UNET.to_dict(), "channels": 32, "groups": 8})
    with pytest.raises(CheckpointError, match="shape"):
        load_weights(build_net(wider), tensors)
    deeper = NetConfig(**{**UNET.to_dict(), "num_res_blocks": 2})
    with pytest.raises(CheckpointError, match="do not match the network config"):
        load_weights(build_net(deeper), tensors)
    with pytest.raises(CheckpointError, match="missing"):
        load_weights(build_net(UNET), {k: v for k, v in tensors.items() if k != "conv_out.bias"})


def test_time_embedding_stays_fp32_under_autocast():
    """bf16 autocast (runs on the CPU too): convolutions in bf16, the time embedding in fp32."""
    net = build_net(UNET).eval()
    load_weights(net, random_checkpoint_tensors(UNET, seed=8))
    seen = {}
    net.time_out.register_forward_hook(lambda m, i, o: seen.__setitem__("emb", o.dtype))
    net.conv_in.register_forward_hook(lambda m, i, o: seen.__setitem__("conv", o.dtype))
    u, t = network_inputs(UNET, 3, seed=9)
    u, t = torch.from_numpy(u).permute(0, 3, 1, 2), torch.from_numpy(t)
    with torch.no_grad():
        ref = net(u, t)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = net(u, t)
    assert seen == {"emb": torch.float32, "conv": torch.bfloat16}
    assert low.dtype == torch.bfloat16
    err = (low.float() - ref).abs().max() / ref.abs().max()
    assert 1e-5 < err < 5e-2  # bf16 was really used, and it is still the same function


@pytest.mark.slow
def test_torch_compile_traces_the_network_under_bf16_autocast():
    """What CUDA training compiles, on the CPU (inductor needs a C++ compiler): the fp32 time
    embedding inside bf16 autocast and the fused attention trace without error, and the compiled
    network computes what eager does."""
    from hold_export.torch_model import apply_channels_last

    tensors = random_checkpoint_tensors(UNET, seed=11)
    net = build_net(UNET).eval()
    load_weights(net, tensors)
    u, t = network_inputs(UNET, 4, seed=12)
    u, t = torch.from_numpy(u), torch.from_numpy(t)
    compiled = torch.compile(net)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        eager = apply_channels_last(net, u, t).float()
        out = apply_channels_last(compiled, u, t).float()
    assert (out - eager).abs().max() <= 2e-2 * eager.abs().max()


def test_label_embedding_rows_move_the_output_and_are_in_the_layout_map():
    """The label embedding is a plain (classes + 1, emb) table in both layouts, and each label
    (the "no label" row included) changes the output: the labels really reach the network."""
    tensors = random_checkpoint_tensors(UNET_COND, seed=8)
    assert tensors["label_emb.weight"].shape == (UNET_COND.num_classes + 1, 4 * UNET_COND.channels)
    assert "label_emb.weight" not in conv_weight_keys(build_net(UNET_COND))
    u, t = network_inputs(UNET_COND, 1, seed=9)
    outs = [torch_alpha(UNET_COND, tensors, u, t, labels=np.array([k])) for k in range(UNET_COND.num_classes + 1)]
    unlabelled = torch_alpha(UNET_COND, tensors, u, t)  # no labels: the "no label" row
    assert np.array_equal(unlabelled, outs[-1])
    gaps = [np.abs(a - b).max() for i, a in enumerate(outs) for b in outs[i + 1:]]
    assert min(gaps) > 1e-3 * np.abs(outs[0]).max()
