"""MLX training: resumes exactly, data-parallel equals one process, NaN stops cleanly, it learns."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest

from conftest import tiny_config

from hold_mlx.checkpoint import MODEL_FILE, STATE_FILE, CheckpointError, read_config, read_tensors
from hold_mlx.data import Dataset, load_dataset
from hold_mlx.trainloop import TrainingDiverged, lr_at


def trainer(cfg, out, **kw):
    from hold_mlx.train import Trainer

    return Trainer(cfg, out, **kw)


def weights(out, prefix=("raw/", "ema/", "adam_")):
    tensors, config = read_tensors(out / STATE_FILE)
    return {k: v for k, v in tensors.items() if k.startswith(prefix)}, config["step"]


def assert_same_state(a, b):
    ta, step_a = weights(a)
    tb, step_b = weights(b)
    assert step_a == step_b and set(ta) == set(tb)
    for k in ta:
        np.testing.assert_array_equal(ta[k], tb[k], err_msg=k)


def test_lr_warmup_schedule():
    cfg = tiny_config(lr=1e-3, warmup=4)
    assert [lr_at(cfg, s) for s in range(6)] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3])
    assert lr_at(tiny_config(lr=1e-3, warmup=0), 0) == 1e-3


def assert_resume_matches_full_run(cfg, tmp_path, partial_run, saved_step: int):
    """Train cfg in one go; in another folder let ``partial_run(trainer)`` stop early; resuming there
    from ``saved_step`` ends in the same state as the full run, bit for bit."""
    full = tmp_path / "full"
    for _ in trainer(cfg, full).run():
        pass
    part = tmp_path / "part"
    partial_run(trainer(cfg, part))
    assert read_config(part / STATE_FILE)["step"] == saved_step
    resumed = trainer(cfg, part)
    assert resumed.step == saved_step
    for _ in resumed.run():
        pass
    assert_same_state(full, part)


def test_sigterm_stops_after_the_step_saves_and_resumes_bitwise(tmp_path):
    def terminate_at_step_4(t):
        for info in t.run():
            if info.step == 4:
                os.kill(os.getpid(), signal.SIGTERM)  # handled: finish this step, save, stop
        assert t.interrupted and t.step == 4

    assert_resume_matches_full_run(tiny_config(steps=10, save_every=100, hflip=True), tmp_path,
                                   terminate_at_step_4, saved_step=4)


def test_hard_kill_resumes_from_last_save_bitwise(tmp_path):
    """A kill -9 loses only the steps after the last periodic save; the end state is unchanged."""
    def abandon_at_step_5(t):
        for info in t.run():
            if info.step == 5:  # abandon mid-way without saving: what a SIGKILL leaves behind
                break

    assert_resume_matches_full_run(tiny_config(steps=9, save_every=3), tmp_path, abandon_at_step_5, saved_step=3)


def test_resume_with_different_settings_is_refused(tmp_path, tiny_run):
    out = tmp_path / "run"
    shutil.copytree(tiny_run, out)
    with pytest.raises(CheckpointError, match="different settings.*weighting"):
        trainer(tiny_config(weighting="likelihood"), out)
    more = trainer(tiny_config(steps=6), out)  # a larger budget is allowed
    assert more.step == 4
    slower = trainer(tiny_config(steps=6, lr=1e-4), out)  # so is a lower learning rate (after divergence)
    assert slower.step == 4 and '"changed": {"lr": [0.0002, 0.0001]}' in (out / "log.jsonl").read_text()


def test_ema_decay_may_change_on_resume_and_weighs_only_later_steps(tmp_path, tiny_run):
    out = tmp_path / "run"
    shutil.copytree(tiny_run, out)
    before, step = weights(out, ("ema/",))
    t = trainer(tiny_config(steps=step + 1, ema_decay=0.5), out)
    for _ in t.run():
        pass
    after, _ = weights(out, ("ema/",))
    raw, _ = weights(out, ("raw/",))
    for key, ema in after.items():  # one update with the new decay: ema = 0.5 ema_before + 0.5 raw
        np.testing.assert_allclose(ema, 0.5 * before[key] + 0.5 * raw["raw/" + key[4:]], rtol=1e-6, atol=1e-7)
    assert '"changed": {"ema_decay": [0.999, 0.5]}' in (out / "log.jsonl").read_text()


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    base = load_dataset("digits")
    data = base.data.copy()
    poisoned = Dataset("digits-nan", data, "image", base.shift, base.scale)
    cfg = tiny_config(steps=20, save_every=2, batch_size=len(data))  # every step sees the whole set
    out = tmp_path / "run"
    t = trainer(cfg, out, dataset=poisoned)
    steps = t.run()
    next(steps), next(steps)  # two good steps, saved
    data[5, 3, 3, 0] = np.nan
    with pytest.raises(TrainingDiverged, match="keeps the checkpoint of step 2"):
        next(steps)
    assert read_config(out / STATE_FILE)["step"] == 2
    tensors, _ = read_tensors(out / MODEL_FILE)
    assert all(np.isfinite(v).all() for v in tensors.values())


def test_compiled_training_lowers_the_loss(tmp_path):
    """The compiled step (the default) learns: on a fixed evaluation batch it removes a good part of
    the excess loss over the exact optimum, computed from the true 8-Gaussians law."""
    from hold_mlx._mlx import mx
    from hold_mlx.exact import GaussianMixture, ExactScore
    from hold_mlx.parameterisation import objective_coefficients
    from hold_mlx.train import _noise_key, score_matching_loss

    cfg = tiny_config(dataset="8gaussians", net="mlp-tiny", sde="hold", steps=600, batch_size=128,
                      lr=3e-3, warmup=20, save_every=1000, compile=True)
    t = trainer(cfg, tmp_path / "run")
    rng = np.random.default_rng(0)
    batch = 4096
    x0 = t.data.data[rng.integers(0, len(t.data), batch)]
    times = t.sde.eps_loss + (t.sde.T - t.sde.eps_loss) * rng.random(batch)
    c = objective_coefficients(t.sde, times).as_float32()
    args = [mx.array(x0), _noise_key((1, 2))] + [mx.array(c[k]) for k in ("t", "mean", "chol", "mixed", "weight")]

    # The optimum: alpha* = -ell s - mixed u_n with s the exact score of the data law (model space).
    angles = 2 * np.pi * np.arange(8) / 8
    means = (2 * np.stack([np.cos(angles), np.sin(angles)], 1) - t.data.shift) / t.data.scale
    covs = np.array([np.diag(0.01 / np.asarray(t.data.scale) ** 2)] * 8)
    exact = ExactScore(t.sde, GaussianMixture(np.ones(8), means, covs))
    def optimum(u, tt):  # called on pieces of the batch (CPU streams): coefficients from tt
        u, tt = np.array(u).astype(np.float64), np.array(tt).astype(np.float64)
        piece = objective_coefficients(t.sde, tt)
        ell, mixed = piece.chol[:, -1, -1, None], piece.mixed[:, None]
        return mx.array((-ell * exact(u, tt) - mixed * u[:, -2:]).astype(np.float32))

    def loss(model):
        return score_matching_loss(model, t.sde.order, *args).item()

    t.net.eval()
    before, floor = loss(t.net), loss(optimum)
    for _ in t.run():
        pass
    t.net.eval()
    after = loss(t.net)
    assert floor < after < before
    assert after - floor < 0.7 * (before - floor), (before, after, floor)


@pytest.mark.skipif(shutil.which("mlx.launch") is None, reason="mlx.launch not on PATH")
def test_data_parallel_mlx_equals_one_process(tmp_path):
    """mlx.launch -n 2 (ring backend on the CPU): each rank trains on half of the global batch and
    the averaged gradients give the single-process weights (float reduction order aside)."""
    script = tmp_path / "dp.py"
    script.write_text(
        "import sys\n"
        "sys.path.insert(0, %r)\n"
        "from conftest import tiny_config\n"
        "from hold_mlx.train import Trainer\n"
        "t = Trainer(tiny_config(steps=3, save_every=3, hflip=True), sys.argv[1])\n"
        "for _ in t.run(): pass\n"
        "print('world', t.world, 'rank', t.rank)\n" % os.path.dirname(__file__))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.dirname(os.path.dirname(__file__)),
                                                        os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([shutil.which("mlx.launch"), "-n", "2", "--backend", "ring", "--", sys.executable,
                           str(script), str(tmp_path / "dp")], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "world 2 rank 0" in proc.stdout and "world 2 rank 1" in proc.stdout
    single = tmp_path / "single"
    for _ in trainer(tiny_config(steps=3, save_every=3, hflip=True), single).run():
        pass
    a, step_a = weights(tmp_path / "dp")
    b, step_b = weights(single)
    assert step_a == step_b == 3
    for k in a:
        if k.startswith("raw/"):
            np.testing.assert_allclose(a[k], b[k], rtol=1e-4, atol=1e-6, err_msg=k)


def test_run_folder_contents(tiny_run):
    config = json.loads((tiny_run / "config.json").read_text())
    assert config["step"] == 4 and config["sde"]["name"] == "hold" and config["layout"] == "mlx"
    assert config["data"]["shape"] == [8, 8, 1] and config["net"]["order"] == 3
    tensors, _ = read_tensors(tiny_run / STATE_FILE)
    assert any(k.startswith("adam_m/") for k in tensors) and "adam_step" in tensors
    assert not list(tiny_run.glob(".*.tmp")), "temporary files left behind"
    log = [json.loads(line) for line in (tiny_run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [2, 4] and all(np.isfinite(r["loss"]) for r in log)
    assert 0 < log[0]["train_seconds"] <= log[1]["train_seconds"] == config["train_seconds"]


@pytest.mark.slow
def test_mlp_learns_the_eight_gaussians(tmp_path):
    """A briefly trained MLP samples the 2-D ring: every mode gets its share, few points stray.

    The budget matters: the modes (std 0.1 at radius 2) need the score at t < 0.1, which the MLP
    learns last; at 2500 steps ~80% of the samples land within 0.5 of a mode, at 4000 ~98%."""
    from hold_mlx.data import make_toy
    from hold_mlx.model import load
    from hold_mlx.data import to_user_units

    cfg = tiny_config(dataset="8gaussians", net="mlp", sde="hold", steps=4000, batch_size=256, lr=2e-3,
                      warmup=100, save_every=4000, compile=True)
    out = tmp_path / "run"
    for _ in trainer(cfg, out).run():
        pass
    model = load(out, "mlx")
    x = model.sample(2000, batch_size=1000, steps=100, seed=3).x
    pts = to_user_units(x, model.config["data"])
    angles = 2 * np.pi * np.arange(8) / 8
    modes = 2 * np.stack([np.cos(angles), np.sin(angles)], 1)
    dist = np.linalg.norm(pts[:, None, :] - modes[None], axis=-1)
    nearest, gap = dist.argmin(1), dist.min(1)
    assert np.mean(gap < 0.5) > 0.9  # the modes have std 0.1
    share = np.bincount(nearest[gap < 0.5], minlength=8) / np.sum(gap < 0.5)
    assert share.min() > 0.06 and share.max() < 0.2, share
    assert make_toy("8gaussians", 10).shape == (10, 2)


@pytest.mark.slow
def test_cifar10_preset_builds_and_takes_a_step(tmp_path):
    from hold_mlx.data import Dataset
    from hold_mlx.nets import count_params

    rng = np.random.default_rng(0)
    fake = Dataset("cifar10-fake", rng.uniform(-1, 1, (4, 32, 32, 3)).astype(np.float32), "image", 0.5, 0.5)
    t = trainer(tiny_config(dataset="cifar10", net="cifar10", steps=1, batch_size=2, save_every=1), tmp_path / "c",
                dataset=fake)
    assert count_params(t.net) > 30e6  # NCSN++-sized
    infos = list(t.run())
    assert infos[-1].step == 1 and np.isfinite(infos[-1].loss)


def test_dropout_masks_follow_the_step_compiled_or_not(tmp_path):
    """Dropout draws from the global random state, reseeded from (seed, step) each step and captured
    by mx.compile: compiled and eager training agree, and a resumed run is bitwise the same."""
    cfg = tiny_config(steps=4, save_every=100, net_params={"dropout": 0.3})
    runs = {}
    for compiled in (False, True):
        out = tmp_path / f"c{int(compiled)}"
        for _ in trainer(tiny_config(**{**cfg.to_dict(), "compile": compiled}), out).run():
            pass
        runs[compiled] = weights(out)[0]
    for k in runs[False]:
        if k.startswith("raw/"):
            np.testing.assert_allclose(runs[True][k], runs[False][k], rtol=1e-4, atol=1e-5, err_msg=k)
    compiled_cfg = tiny_config(**{**cfg.to_dict(), "compile": True})
    part = tmp_path / "part"
    t = trainer(compiled_cfg, part)
    for info in t.run():
        if info.step == 2:
            os.kill(os.getpid(), signal.SIGTERM)
    for _ in trainer(compiled_cfg, part).run():
        pass
    assert_same_state(tmp_path / "c1", part)
