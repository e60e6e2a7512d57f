"""The network plan (hold_mlx.netplan) against the two nets built from it and torch's FLOP counter."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from hold_export.flops import layer_flops  # noqa: E402
from hold_export.torch_nets import build_net as build_torch  # noqa: E402
from hold_mlx.netconfig import NetConfig, net_preset  # noqa: E402
from hold_mlx.netplan import EmbeddingTerm, Layer, NetPlan, embed, net_plan, place_layer, run_body  # noqa: E402
from torch_fixtures import one_thread  # noqa: E402,F401

# attention at 4x4, 1x1 skip convs, down/up sampling; 3 colour channels and a 12 -> 6 -> 3 pyramid
# with attention at two levels and two res blocks per level; the MLP
CONFIGS = [
    NetConfig(kind="unet", data_channels=1, order=3, image_size=8, channels=16, channel_mult=(1, 2),
              num_res_blocks=1, attn_resolutions=(4,), groups=4),
    NetConfig(kind="unet", data_channels=3, order=2, image_size=12, channels=16, channel_mult=(1, 2, 2),
              num_res_blocks=2, attn_resolutions=(6, 3), groups=8),
    net_preset("mlp-tiny", data_channels=2, order=3),
    NetConfig(kind="unet", data_channels=1, order=3, image_size=8, channels=16, channel_mult=(1, 2),
              num_res_blocks=1, attn_resolutions=(4,), groups=4, num_classes=10),
]
IDS = ["unet", "unet-rgb", "mlp", "unet-cond"]


def _counted_by_module(cfg) -> dict[str, float]:
    """torch.utils.flop_counter's forward FLOPs per module name (one image, math attention)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    net = build_torch(cfg)
    width = cfg.order * cfg.data_channels
    u = torch.randn(1, width, cfg.image_size, cfg.image_size) if cfg.kind == "unet" else torch.randn(1, width)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter, torch.no_grad():
        net(u, torch.full((1,), 0.5))
    prefix = type(net).__name__ + "."
    counts = {name.removeprefix(prefix): float(sum(c.values())) for name, c in counter.get_flop_counts().items()}
    return counts, float(counter.get_total_flops())


@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
def test_plan_flops_equal_torchs_flop_counter_layer_by_layer(cfg):
    analytic = layer_flops(cfg)
    counted, total = _counted_by_module(cfg)
    assert list(analytic) == [layer.name for layer in net_plan(cfg).layers]
    for name, flops in analytic.items():  # FLOP-free layers (Fourier features, norms) are absent there
        assert sum(flops.values()) == counted.get(name, 0.0), name
    assert sum(sum(f.values()) for f in analytic.values()) == total > 0


@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
def test_every_plan_layer_owns_parameters_in_both_nets(cfg):
    from hold_mlx.model import flat_params
    from hold_mlx.nets import build_net as build_mlx

    mlx_keys = set(flat_params(build_mlx(cfg).parameters()))
    torch_state = build_torch(cfg).state_dict()
    plan = net_plan(cfg)
    owned = set()
    for layer in plan.layers:
        prefix = layer.name + "."
        mine = {k for k in mlx_keys if k.startswith(prefix)}
        assert mine and mine == {k for k in torch_state if k.startswith(prefix)}, layer.name
        assert not mine & owned, layer.name  # no name is a prefix of another's keys
        owned |= mine
        if layer.kind == "norm_silu":
            assert tuple(torch_state[prefix + "weight"].shape) == (layer.c_in,)
        if layer.kind == "fourier":
            assert tuple(torch_state[prefix + "W"].shape) == (layer.c_out // 2,)
    assert owned == mlx_keys == set(torch_state)


def test_unet_plan_wiring():
    """conv_in, every down res block and downsample push a skip; the up res blocks pop them in
    reverse order; channels and sizes chain from each layer to the next."""
    plan = net_plan(CONFIGS[1])
    stack = []
    for prev, layer in zip(plan.body, plan.body[1:]):
        if prev.skip_out:
            stack.append(prev.c_out)
        assert layer.c_in == prev.c_out + (stack.pop() if layer.skip_in else 0), layer.name
        assert layer.size == prev.size_out, layer.name
    assert stack == []
    pushed = [layer.name for layer in plan.body if layer.skip_out]
    # 12x12: no attention; 6x6 and 3x3: each res block is followed by an attention layer (not pushed)
    assert pushed == ["conv_in", "down.0.0", "down.0.1", "down.0.2", "down.1.0", "down.1.2", "down.1.4",
                      "down.2.0", "down.2.2"]
    # down 6, 6, 3, 3; mid 3; up 3 x 3 and 6 x 3 (num_res_blocks + 1 each)
    assert [layer.size for layer in plan.body if layer.kind == "attention"] == [6, 6, 3, 3, 3, 3, 3, 3, 6, 6, 6]
    assert plan.body[-1] == Layer("conv", "conv_out", 16, 3, 12, zero_init=True)
    assert [layer.name for layer in plan.embedding[0].layers] == ["time_features", "time_in", "time_out"]


def test_plan_names_out_of_order_are_refused():
    class Root:
        pass

    root = Root()
    place_layer(root, Layer("linear", "layers.0", 2, 2), "first")
    with pytest.raises(ValueError, match="out of order"):
        place_layer(root, Layer("linear", "layers.2", 2, 2), "skips one")
    with pytest.raises(ValueError, match="out of order"):
        place_layer(root, Layer("linear", "layers.0", 2, 2), "repeats one")
    assert root.layers == ["first"]
    with pytest.raises(ValueError, match="unknown layer kind"):
        Layer("lstm", "x", 1, 1)


def test_wiring_runs_on_plain_numbers():
    """embed sums its terms, each a chain over its own input; run_body pops skips last-in first-out,
    adds residuals and the embedding where the plan says (run multiplies by a per-layer factor)."""
    factor = {"a": 2, "b": 3, "c": 5, "in": 7, "res": 11, "cat": 13}
    run = lambda layer, x, emb: x * factor[layer.name]  # noqa: E731
    embedding = (EmbeddingTerm("t", (Layer("linear", "a", 1, 1),)),
                 EmbeddingTerm("label", (Layer("linear", "b", 1, 1), Layer("linear", "c", 1, 1))))
    body = (Layer("linear", "in", 1, 1, add_embedding=True, skip_out=True),
            Layer("linear", "res", 1, 1, residual=True),
            Layer("linear", "cat", 2, 1, skip_in=1))
    plan = NetPlan("mlp", 1, 1, 0.0, 1.0, embedding, body)
    emb = embed(plan, run, {"t": 1.0, "label": 10.0})
    assert emb == 2 * 1.0 + 5 * 3 * 10.0
    h0 = 7 * 2.0 + emb
    h1 = h0 + 11 * h0
    assert run_body(plan, run, lambda h, skip: h - skip, 2.0, emb) == 13 * (h1 - h0)


def test_conditional_plan_adds_one_label_term_and_leaves_the_rest():
    """num_classes adds a "label" embedding term (classes + "no label" rows, the embedding's
    width) after the time term; every other layer is the unconditional plan's."""
    base = net_preset("mlp-tiny", data_channels=2, order=3)
    cond = net_preset("mlp-tiny", data_channels=2, order=3, num_classes=4)
    plain, labelled = net_plan(base), net_plan(cond)
    assert labelled.embedding[:-1] == plain.embedding and labelled.body == plain.body
    term = labelled.embedding[-1]
    assert term.input == "label" and term.layers == (Layer("embedding", "label_emb", 5, labelled.emb_dim),)
    assert "num_classes" not in base.to_dict() and cond.to_dict()["num_classes"] == 4
    assert NetConfig.from_dict(base.to_dict()) == base and NetConfig.from_dict(cond.to_dict()) == cond
    with pytest.raises(ValueError, match="num_classes"):
        NetConfig(num_classes=-1)
