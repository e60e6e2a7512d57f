"""Model FLOPs (analytic vs torch's counter) and tools/bench_cuda.py on the CPU."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from hold_export.flops import TRAIN_FACTOR, counted_flops, forward_flops  # noqa: E402
from hold_mlx.netconfig import NetConfig, net_preset  # noqa: E402
from torch_fixtures import one_thread  # noqa: E402,F401

ROOT = Path(__file__).resolve().parent.parent


def _bench():
    spec = importlib.util.spec_from_file_location("bench_cuda", ROOT / "tools" / "bench_cuda.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("cfg", [
    net_preset("fashion-mnist", image_size=28, data_channels=1, order=3),
    NetConfig(kind="unet", data_channels=3, order=2, image_size=12, channels=16, channel_mult=(1, 2, 2),
              num_res_blocks=2, attn_resolutions=(6, 3), groups=8),
    net_preset("mlp", data_channels=2, order=3),
], ids=["fashion-mnist", "rgb-two-attention-levels", "mlp"])
def test_analytic_flops_equal_torchs_flop_counter(cfg):
    analytic = forward_flops(cfg)
    forward, train = counted_flops(cfg)
    assert sum(analytic.values()) == pytest.approx(forward, rel=1e-12)
    # backward = input and weight gradients (2x forward), except conv_in's input gradient
    assert train / forward == pytest.approx(TRAIN_FACTOR, rel=0.1)
    assert train / forward < TRAIN_FACTOR


def test_cifar10_width_flops_by_hand():
    """The CIFAR-10 preset cut to one level without res blocks, counted by hand: conv_in, the
    middle (2 res blocks = 4 convs, attention over 32*32 tokens), one up block on the concatenated
    skip (256 -> 128 channels, with a 1x1 skip conv), conv_out."""
    cfg = net_preset("cifar10", image_size=32, data_channels=3, order=3)
    bare = NetConfig(**{**cfg.to_dict(), "channel_mult": (1,), "num_res_blocks": 0, "attn_resolutions": ()})
    pixels, c = 32 * 32, 128
    conv_in = 2 * 9 * (3 * 3) * c * pixels
    mid = 4 * 2 * 9 * c * c * pixels
    up = 2 * 9 * 2 * c * c * pixels + 2 * 9 * c * c * pixels + 2 * 2 * c * c * pixels
    conv_out = 2 * 9 * c * 3 * pixels
    flops = forward_flops(bare)
    assert flops["conv"] == conv_in + mid + up + conv_out
    assert flops["attention"] == 2 * 2 * pixels**2 * c


def test_peak_table_picks_the_specific_name_first():
    bench = _bench()
    assert bench.peak_tflops("NVIDIA H100 80GB HBM3", None) == 989.0
    assert bench.peak_tflops("NVIDIA H100 PCIe", None) == 756.0
    assert bench.peak_tflops("NVIDIA H200", None) == 989.0
    assert bench.peak_tflops("NVIDIA A100-SXM4-80GB", None) == 312.0
    assert bench.peak_tflops("NVIDIA L40S", None) == 362.0
    assert bench.peak_tflops("Some Future GPU", None) is None
    assert bench.peak_tflops("Some Future GPU", 1234.0) == 1234.0


def test_bench_runs_on_the_cpu_and_writes_its_docs_section(tmp_path, capsys):
    doc = tmp_path / "torch.md"
    doc.write_text("# intro\n\n<!-- bench_cuda:cpu -->\nold figures\n<!-- /bench_cuda:cpu -->\n\ntail\n")
    bench = _bench()
    threads = torch.get_num_threads()
    try:
        assert bench.main(["--device", "cpu", "--presets", "tiny", "--quick", "--batch", "4", "--train-steps", "1",
                           "--sample-batch", "2", "--sample-steps", "1", "--threads", "1", "--doc", str(doc)]) == 0
    finally:
        torch.set_num_threads(threads)
    text = doc.read_text()
    assert "old figures" not in text and text.startswith("# intro") and text.rstrip().endswith("tail")
    section = text.split("<!-- bench_cuda:cpu -->")[1].split("<!-- /bench_cuda:cpu -->")[0]
    assert "tools/bench_cuda.py --device cpu" in section
    assert "| tiny | fp32 |" in section and "| tiny | fp32 portable |" in section
    parity = [line for line in section.splitlines() if line.startswith("| tiny | 0.")][0]
    assert float(parity.split("|")[5]) < 1e-5  # MLX vs torch on the preset
    assert "| tiny | fp32 |" in capsys.readouterr().out
