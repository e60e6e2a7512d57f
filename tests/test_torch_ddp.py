"""Data-parallel torch training: `torchrun --standalone --nproc_per_node 2` with gloo on the CPU."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from hold_export.parity import one_torch_thread, weight_gap_in_steps  # noqa: E402
from hold_mlx.checkpoint import MODEL_FILE, STATE_FILE, read_config  # noqa: E402

CONFIG = dict(dataset="digits", net="tiny", batch_size=8, lr=2e-3, warmup=0, sde="hold", backend="torch",
              compile=False, steps=3, save_every=3)

# Trains CONFIG and records, per step, the data, noise and times this process saw, its losses and
# its final weights: the same code runs under torchrun (2 ranks) and in the test process (1).
WORKER = textwrap.dedent("""
    import json, sys
    import numpy as np
    from hold_export.torch_model import checkpoint_tensors
    from hold_export.torch_train import TorchTrainer
    from hold_mlx.trainloop import TrainConfig

    class Recording(TorchTrainer):
        def _noise(self, batch, data_shape):
            eps = super()._noise(batch, data_shape)
            self.seen.append((batch.x0.copy(), eps.cpu().numpy(), batch.t.copy()))
            return eps

    def train_and_record(out, config):
        trainer = Recording(TrainConfig(**config), out)
        trainer.seen = []
        losses = [info.loss for info in trainer.run()]
        return trainer.rank, dict(
            world=trainer.world, losses=np.array(losses), x0=np.stack([s[0] for s in trainer.seen]),
            eps=np.stack([s[1] for s in trainer.seen]), t=np.stack([s[2] for s in trainer.seen]),
            **{"raw/" + k: v for k, v in checkpoint_tensors(trainer.net).items()})

    if __name__ == "__main__":
        import torch
        torch.set_num_threads(1)
        out, record, config = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
        rank, arrays = train_and_record(out, config)
        np.savez(f"{record}/rank{rank}.npz", **arrays)
""")


def _worker(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    spec = importlib.util.spec_from_file_location("ddp_worker", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return script, module


def _torchrun(tmp_path, script, name):
    record = tmp_path / f"{name}-record"
    record.mkdir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    done = subprocess.run(launcher + [str(script), str(tmp_path / name), str(record), json.dumps(CONFIG)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return [dict(np.load(path)) for path in sorted(record.glob("rank*.npz"))]


def test_two_gloo_ranks_train_like_one_process_on_the_full_batch(tmp_path):
    script, worker = _worker(tmp_path)
    rank0, rank1 = _torchrun(tmp_path, script, "ddp")
    with one_torch_thread():
        _, single = worker.train_and_record(tmp_path / "single", CONFIG)
    assert int(rank0["world"]) == int(rank1["world"]) == 2 and int(single["world"]) == 1

    # each rank sees its own half of every global batch: data, noise and times
    assert rank0["x0"].shape == (CONFIG["steps"], 4, 8, 8, 1)
    assert not np.array_equal(rank0["x0"], rank1["x0"])
    assert np.array_equal(np.concatenate([rank0["x0"], rank1["x0"]], axis=1), single["x0"])
    assert np.array_equal(np.concatenate([rank0["eps"], rank1["eps"]], axis=2), single["eps"])
    assert np.array_equal(np.concatenate([rank0["t"], rank1["t"]], axis=1), single["t"])

    # gradients are averaged: both ranks end with identical weights ...
    weights = [k for k in rank0 if k.startswith("raw/")]
    assert all(np.array_equal(rank0[k], rank1[k]) for k in weights)
    # ... equal to one process on the full batch up to the order of the float sums (the mean of
    # two half-batch means vs one mean), which Adam turns into a tiny fraction of a step
    assert np.allclose(rank0["losses"], single["losses"], rtol=1e-5)
    typical, worst = weight_gap_in_steps(rank0, single, CONFIG["lr"], prefixes=("raw/",))
    assert typical < 1e-3 and worst < 0.05

    # rank 0 wrote the run folder
    assert read_config(tmp_path / "ddp" / STATE_FILE)["step"] == CONFIG["steps"]
    assert (tmp_path / "ddp" / MODEL_FILE).is_file()
