"""Hostile use: bad inputs on every command and backend, kills, a full disk, two trainers on one
folder. Every bad input must end quickly with a one-line ``Error:`` that names the file or option,
a non-zero exit code, no traceback, and no data lost (docs/reliability.md).

Most cases run the CLI in-process (click's runner: fast); kills, signals, locks and environment
variables run it in a subprocess, as a user would.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import REPO, run_cli

HOLD = [sys.executable, "-m", "hold_mlx"]


# ----------------------------------------------------------------------------- helpers


def cli(*args, env=None):
    from hold_mlx.cli import main

    return CliRunner().invoke(main, [str(a) for a in args], env=env, catch_exceptions=True)


def assert_clean_error(result, *fragments):
    """Non-zero exit, no traceback, the last line an ``Error:`` with every fragment in it."""
    if hasattr(result, "exit_code"):  # click runner
        assert result.exception is None or isinstance(result.exception, SystemExit), \
            f"traceback: {result.exception!r}\n{result.output}"
        code, text = result.exit_code, result.output
    else:  # subprocess
        code, text = result.returncode, result.stdout + result.stderr
        assert "Traceback" not in text, text
    assert code not in (0, None), text
    lines = [line for line in text.strip().splitlines() if line.strip()]
    assert lines and lines[-1].startswith("Error:"), text
    for fragment in fragments:
        assert fragment in lines[-1], (fragment, lines[-1])
    return lines[-1]


def tamper(src_run: Path, dst: Path, edit_config=None, edit_tensors=None) -> Path:
    """A copy of a run's model file with its config and/or tensors edited (checksum recomputed,
    as a well-meaning but wrong tool would write it)."""
    from hold_mlx.checkpoint import read_tensors, write_tensors

    tensors, config = read_tensors(src_run / "model.safetensors")
    config = json.loads(json.dumps(config))
    if edit_config:
        edit_config(config)
    if edit_tensors:
        edit_tensors(tensors)
    write_tensors(dst, tensors, config)
    return dst


def png_claiming(width: int, height: int) -> bytes:
    """A 1x1 PNG whose header claims width x height pixels (a decompression bomb's signature)."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("L", (1, 1)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    ihdr = data.index(b"IHDR")
    data[ihdr + 4:ihdr + 12] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr:ihdr + 17]))
    data[ihdr + 17:ihdr + 21] = struct.pack(">I", crc)
    return bytes(data)


@pytest.fixture(scope="module")
def points_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("pts") / "pts.npy"
    np.save(path, np.random.default_rng(0).normal(size=(256, 2)))
    return path


# ----------------------------------------------------------------------------- 1. silent overwrite


def test_finished_model_is_never_overwritten(tmp_path, tiny_points_run, points_file):
    run = tmp_path / "finished"
    run.mkdir()
    shutil.copy(tiny_points_run / "model.safetensors", run)
    before = (run / "model.safetensors").read_bytes()
    result = cli("train", "--dataset", points_file, "--out", run, "--steps", "2", "--batch-size", "8", "--no-compile")
    assert_clean_error(result, "no train_state.safetensors", "--init-from")
    assert (run / "model.safetensors").read_bytes() == before
    assert not (run / "log.jsonl").exists()


def test_init_from_fine_tunes_from_the_weights(tmp_path, tiny_points_run):
    from hold_mlx.checkpoint import read_tensors

    out = tmp_path / "tuned"
    result = cli("train", "--dataset", "8gaussians", "--net", "mlp-tiny", "--sde", "cld", "--out", out,
                 "--init-from", tiny_points_run, "--steps", "1", "--batch-size", "8", "--save-every", "1",
                 "--no-compile", "--lr", "1e-12", "--warmup", "0")
    assert result.exit_code == 0, result.output
    source, _ = read_tensors(tiny_points_run / "model.safetensors")
    tuned, config = read_tensors(out / "train_state.safetensors")
    assert config["train"]["init_from"] == str(tiny_points_run)
    assert int(tuned["adam_step"][0]) == 1 and config["step"] == 1  # fresh optimizer, counted from 0
    for key, value in source.items():  # one step at lr 1e-12 moves nothing visibly
        np.testing.assert_allclose(tuned[f"raw/{key}"], value, atol=1e-6)
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert log[0]["init_from"].endswith("model.safetensors")
    wrong = cli("train", "--dataset", "8gaussians", "--net", "mlp", "--sde", "cld", "--out", tmp_path / "w",
                "--init-from", tiny_points_run, "--steps", "1", "--batch-size", "8", "--no-compile")
    assert_clean_error(wrong, "--init-from", "shape")


# ----------------------------------------------------------------------------- 2. one trainer per folder


def test_second_trainer_on_a_folder_is_refused_and_a_killed_lock_is_not_stale(tmp_path):
    run = tmp_path / "locked"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from hold_mlx.checkpoint import lock_run_folder; "
                               f"lock = lock_run_folder({str(run)!r}); print('held', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert holder.stdout.readline().strip() == "held"
        result = cli("train", "--dataset", "8gaussians", "--out", run, "--steps", "1", "--batch-size", "8",
                     "--no-compile")
        assert_clean_error(result, "in use by another training run", f"pid {holder.pid}")
        assert not (run / "model.safetensors").exists()
    finally:
        holder.kill()
        holder.wait()
    # The kernel released the killed holder's lock: the next run trains.
    result = cli("train", "--dataset", "8gaussians", "--net", "mlp-tiny", "--out", run, "--steps", "1",
                 "--batch-size", "8", "--no-compile", "--sample-steps", "2")
    assert result.exit_code == 0, result.output
    assert (run / "model.safetensors").is_file()


# ----------------------------------------------------------------------------- 3. atomic writes


@contextlib.contextmanager
def _tmpfs(mount: Path, options: str):
    """A 1 MiB tmpfs at ``mount`` (root only); the test is skipped where it cannot be mounted."""
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size=1m{options}", "tmpfs", str(mount)],
                      capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


@pytest.fixture
def tiny_disk(tmp_path):
    with _tmpfs(tmp_path / "disk", "") as mount:
        yield mount


def _fill(folder: Path) -> None:
    with open(folder / "filler", "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass


def test_full_disk_keeps_the_old_samples_and_log(tiny_disk, tiny_points_run):
    old_png = tiny_disk / "samples.png"
    old_png.write_bytes(b"old picture")
    log = tiny_disk / "log.jsonl"
    log.write_text('{"step": 2}\n')
    _fill(tiny_disk)
    result = cli("sample", "--checkpoint", tiny_points_run, "--n", "2000", "--steps", "2", "--out", old_png)
    assert_clean_error(result, str(old_png), "disk is full")
    assert old_png.read_bytes() == b"old picture"
    from hold_mlx.checkpoint import CheckpointError, append_line

    with pytest.raises(CheckpointError, match="disk is full"):
        append_line(log, json.dumps({"step": 4, "loss": 1.0, "pad": "x" * 100_000}))
    assert log.read_text() == '{"step": 2}\n'
    assert not [p for p in tiny_disk.iterdir() if p.name.startswith(".samples")]  # no temporary left


def test_training_on_a_full_disk_keeps_the_last_checkpoint(tiny_disk):
    from hold_mlx.checkpoint import read_tensors

    run = tiny_disk / "run"
    base = ["train", "--dataset", "8gaussians", "--net", "mlp-tiny", "--out", run, "--batch-size", "8",
            "--no-compile", "--save-every", "1", "--sample-steps", "2"]
    assert cli(*base, "--steps", "1").exit_code == 0, "a tiny run fits in 1 MiB"
    log = (run / "log.jsonl").read_bytes()
    _fill(tiny_disk)
    assert_clean_error(cli(*base, "--steps", "3"), str(run), "disk is full")
    assert read_tensors(run / "train_state.safetensors")[1]["step"] == 1  # checksum and config intact
    assert read_tensors(run / "model.safetensors")[1]["step"] == 1
    assert (run / "log.jsonl").read_bytes() == log


def test_failed_log_append_leaves_the_old_content(tmp_path, monkeypatch):
    """Without a tmpfs: a write that fails half-way (ENOSPC) is cut off again."""
    import errno

    from hold_mlx import checkpoint

    log = tmp_path / "log.jsonl"
    log.write_text('{"step": 2}\n')
    real_write = os.write

    def half_then_full(fd, data):
        if len(data) > 10:
            real_write(fd, data[:10])
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(checkpoint.os, "write", half_then_full)
    with pytest.raises(checkpoint.CheckpointError, match="log.jsonl.*disk is full"):
        checkpoint.append_line(log, '{"step": 4, "loss": 0.5}')
    assert log.read_text() == '{"step": 2}\n'


def test_out_that_is_a_folder_or_a_link(tmp_path, tiny_points_run):
    folder = tmp_path / "pics.png"
    folder.mkdir()
    assert_clean_error(cli("sample", "--checkpoint", tiny_points_run, "--n", "4", "--steps", "2", "--out", folder),
                       "folder")
    from hold_mlx.checkpoint import CheckpointError, atomic_write

    with pytest.raises(CheckpointError, match="directory"):
        atomic_write(folder, b"x")
    # A link in the place of a file the run writes is replaced, never written through.
    target = tmp_path / "precious.txt"
    target.write_text("keep")
    link = tmp_path / "s.npz"
    link.symlink_to(target)
    assert cli("sample", "--checkpoint", tiny_points_run, "--n", "4", "--steps", "2", "--out", link).exit_code == 0
    assert target.read_text() == "keep" and not link.is_symlink()


def test_symlinked_log_is_refused_before_training(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    target = tmp_path / "elsewhere.txt"
    target.write_text("keep")
    (run / "log.jsonl").symlink_to(target)
    result = cli("train", "--dataset", "8gaussians", "--out", run, "--steps", "1", "--batch-size", "8", "--no-compile")
    assert_clean_error(result, "log.jsonl", "symbolic link")
    assert target.read_text() == "keep"


def test_read_only_run_folder_is_found_before_training(tmp_path):
    with _tmpfs(tmp_path / "ro", ",ro") as mount:
        start = time.time()
        result = cli("train", "--dataset", "8gaussians", "--out", mount, "--steps", "100000", "--batch-size", "8",
                     "--no-compile")
        assert_clean_error(result, str(mount), "not writable")
        assert time.time() - start < 20


# ----------------------------------------------------------------------------- 4. corrupt / non-finite weights


@pytest.mark.parametrize("backend", ["mlx", "torch"])
def test_corrupt_and_non_finite_checkpoints(tmp_path, tiny_points_run, backend):
    pytest.importorskip(backend if backend != "mlx" else "mlx.core")

    def nan_weight(tensors):
        key = sorted(tensors)[0]
        tensors[key] = tensors[key].copy()
        tensors[key].reshape(-1)[0] = np.nan

    nan_file = tamper(tiny_points_run, tmp_path / "nan.safetensors", edit_tensors=nan_weight)
    out = tmp_path / "x.png"
    assert_clean_error(cli("sample", "--checkpoint", nan_file, "--backend", backend, "--out", out), "NaN or Inf")
    assert not out.exists()
    if backend == "torch":  # export reads the checkpoint through the torch loader
        assert_clean_error(cli("export", "--checkpoint", nan_file, "--out", tmp_path / "m.onnx"), "NaN or Inf")

    flipped = tmp_path / "flip.safetensors"
    data = bytearray((tiny_points_run / "model.safetensors").read_bytes())
    data[-100] ^= 0x10  # one bit inside the last tensor's data
    flipped.write_bytes(bytes(data))
    assert_clean_error(cli("sample", "--checkpoint", flipped, "--backend", backend, "--out", out), "checksum")

    truncated = tmp_path / "cut.safetensors"
    truncated.write_bytes(bytes(data[: len(data) // 2]))
    assert_clean_error(cli("sample", "--checkpoint", truncated, "--backend", backend, "--out", out),
                       str(truncated))


def test_shipped_weights_without_checksum_still_load():
    from hold_mlx.checkpoint import read_tensors

    path = REPO / "weights" / "fashion-mnist-hold-uncond" / "model.safetensors"  # written before checksums
    header = path.read_bytes()[: 8 + int.from_bytes(path.read_bytes()[:8], "little")]
    assert b"hold_mlx_sha256" not in header  # an old checkpoint: loads without verification
    tensors, config = read_tensors(path)
    assert config["data"]["name"] == "fashion-mnist" and len(tensors) > 10


def test_divergence_never_replaces_the_last_good_checkpoint(tmp_path):
    from hold_mlx.checkpoint import read_tensors

    run = tmp_path / "div"
    base = ["train", "--dataset", "8gaussians", "--net", "mlp-tiny", "--out", run, "--batch-size", "8",
            "--no-compile", "--save-every", "1", "--warmup", "0", "--sample-steps", "2"]
    assert cli(*base, "--steps", "2").exit_code == 0
    good = (run / "model.safetensors").read_bytes()
    message = assert_clean_error(cli(*base, "--steps", "6", "--lr", "1e30"), "diverged", "--lr")
    assert (run / "model.safetensors").read_bytes() == good  # the exploded weights (~1e27) were not kept
    weights, config = read_tensors(run / "model.safetensors")
    assert config["step"] == 2 and max(np.abs(w).max() for w in weights.values()) < 1e3
    # The advice works: the printed command resumes from the kept checkpoint with the lower --lr.
    suggested = message.split("hold-mlx ", 1)[1].split()
    assert suggested[:3] == ["train", "--out", str(run)]
    result = cli(*suggested, "--steps", "3")
    assert result.exit_code == 0, result.output
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert any(r.get("changed", {}).get("lr") == [2e-4, 1e30] for r in log)  # the attempt is on record
    samples = tmp_path / "s.npz"
    assert cli("sample", "--checkpoint", run, "--n", "16", "--steps", "5", "--out", samples).exit_code == 0
    assert np.isfinite(np.load(samples)["samples"]).all()


# ----------------------------------------------------------------------------- 5-7, 9, 10. bad values


TRAIN_POINTS = ["train", "--dataset", "8gaussians", "--steps", "1", "--batch-size", "8", "--no-compile"]
BAD_TRAIN = [
    (["--grad-clip", "nan"], "--grad-clip"),
    (["--weight-decay", "-1"], "--weight-decay"),
    (["--weight-decay", "nan"], "--weight-decay"),
    (["--lr", "inf"], "--lr"),
    (["--ema-decay", "1.5"], "--ema-decay"),
    (["--sde-param", "T=abc"], "T must be a finite number"),
    (["--sde-param", "T=NaN"], "T must be a finite number"),
    (["--sde-param", "beta=-1", "--sde", "cld"], "beta must be > 0"),
    (["--sde-param", "order=200"], "order must be an integer from 1 to 8"),
    (["--sde-param", "bogus=1"], "bogus"),
    (["--sde-param", "novalue"], "key=value"),
    (["--order", "200"], "--order"),
    (["--net-param", "bogus=1"], "unknown network setting"),
    (["--net-param", "hidden=abc"], "hidden must be an integer"),
    (["--net-param", "hidden=-5"], "hidden must be an integer"),
    (["--net-param", "hidden=100000000"], "GiB"),
    (["--net", "mlp", "--batch-size", "100000000"], "GiB"),
    (["--seed", str(2**70)], "--seed"),
    (["--net", "tiny"], "does not fit points"),
    (["--net", "nonsense"], "unknown network preset"),
    (["--sample-steps", "100000000000"], "--sample-steps"),
    (["--image-size", "-3"], "--image-size"),
    (["--backend", "torch", "--grad-clip", "nan"], "--grad-clip"),
    (["--backend", "torch", "--net-param", "hidden=abc"], "hidden must be an integer"),
    (["--backend", "torch", "--sde-param", "T=abc"], "T must be a finite number"),
]


@pytest.mark.parametrize("extra,fragment", BAD_TRAIN, ids=[" ".join(a) for a, _ in BAD_TRAIN])
def test_bad_train_values(tmp_path, extra, fragment):
    start = time.time()
    assert_clean_error(cli(*TRAIN_POINTS, "--out", tmp_path / "run", *extra), fragment)
    assert time.time() - start < 10
    assert not (tmp_path / "run" / "model.safetensors").exists()


def test_unet_widths_are_checked_before_building(tmp_path):
    base = ["train", "--dataset", "digits", "--steps", "1", "--batch-size", "8", "--no-compile", "--out", tmp_path]
    assert_clean_error(cli(*base, "--net-param", "channels=-8"), "channels must be an integer")
    assert_clean_error(cli(*base, "--net-param", "channel_mult=[1,0]"), "channel_mult")
    assert_clean_error(cli(*base, "--net-param", "channels=1000000"), "GiB")


def test_bad_data_files(tmp_path):
    def train(dataset, *extra):
        return cli("train", "--dataset", dataset, "--out", tmp_path / "run", "--steps", "1", "--batch-size", "8",
                   "--no-compile", *extra)

    np.save(tmp_path / "complex.npy", np.ones((10, 2), np.complex64))
    assert_clean_error(train(tmp_path / "complex.npy"), "real numbers")
    np.save(tmp_path / "huge.npy", np.array([[1e308, 0.0], [-1e308, 1.0], [1e308, 2.0]]))
    assert_clean_error(train(tmp_path / "huge.npy"), "too large")
    np.save(tmp_path / "strings.npy", np.array([["a", "b"], ["c", "d"]]))
    assert_clean_error(train(tmp_path / "strings.npy"), "real numbers")
    (tmp_path / "garbage.npy").write_bytes(b"not numpy")
    assert_clean_error(train(tmp_path / "garbage.npy"), "garbage.npy")

    bombs = tmp_path / "bombs"
    bombs.mkdir()
    (bombs / "a.png").write_bytes(png_claiming(100_000, 100_000))  # over PIL's own limit
    assert_clean_error(train(bombs), "a.png", "decompression bomb")
    (bombs / "a.png").write_bytes(png_claiming(9000, 9000))  # under PIL's, over hold-mlx's cap
    assert_clean_error(train(bombs), "a.png", "decompression bomb")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    assert_clean_error(train(broken), "b.png")

    idx = tmp_path / "idx"
    idx.mkdir()
    (idx / "train-images-idx3-ubyte").write_bytes(b"\0\0\x08\x03\0\0")  # 3 dims promised, header cut
    assert_clean_error(train("mnist", "--data-dir", idx), "train-images-idx3-ubyte", "malformed")
    (idx / "train-images-idx3-ubyte").write_bytes(b"\0\0\x08\x03" + struct.pack(">III", 10**9, 28, 28) + b"\0" * 99)
    assert_clean_error(train("mnist", "--data-dir", idx), "header promises")

    cifar = tmp_path / "cifar-10-batches-py"
    cifar.mkdir()
    import pickle

    for name in [f"data_batch_{i}" for i in range(1, 6)]:
        (cifar / name).write_bytes(pickle.dumps({b"data": np.zeros((2, 5), np.uint8), b"labels": [0, 1]},
                                                protocol=2))
    assert_clean_error(train("cifar10", "--data-dir", tmp_path), "data_batch_1", "not a CIFAR-10 python batch")
    for name in [f"data_batch_{i}" for i in range(1, 6)]:
        (cifar / name).write_bytes(pickle.dumps({b"labels": [0]}))
    assert_clean_error(train("cifar10", "--data-dir", tmp_path), "not a CIFAR-10 python batch")


def _bad_configs():
    def set_path(path, value):
        def edit(config):
            node = config
            for key in path[:-1]:
                node = node[key]
            node[path[-1]] = value
        return edit

    def drop(path):
        def edit(config):
            node = config
            for key in path[:-1]:
                node = node[key]
            del node[path[-1]]
        return edit

    return [
        ("net-list", set_path(["net"], [1, 2]), "'net' must be a JSON object"),
        ("sde-string", set_path(["sde"], "hold"), "'sde' must be a JSON object"),
        ("no-hidden", drop(["net", "data_channels"]), "lacks"),
        ("hidden-string", set_path(["net", "hidden"], "abc"), "hidden must be an integer"),
        ("negative-width", set_path(["net", "hidden"], -3), "hidden must be an integer"),
        ("video", set_path(["data", "kind"], "video"), "data.kind"),
        ("shape-mismatch", set_path(["net", "data_channels"], 3), "data_channels"),
        ("sde-nan-T", set_path(["sde", "T"], "NaN"), "T must be a finite number"),
        ("no-sde-name", drop(["sde", "name"]), "'name'"),
        ("bad-scale", set_path(["data", "scale"], [0.0, 1.0]), "data.scale"),
        ("order-mismatch", set_path(["net", "order"], 3), "net.order"),
        ("objective-not-bool", set_path(["objective", "mixed_score"], "yes"), "mixed_score"),
    ]


BAD_CONFIGS = _bad_configs()


@pytest.mark.parametrize("backend", ["mlx", "torch"])
@pytest.mark.parametrize("name,edit,fragment", BAD_CONFIGS, ids=[c[0] for c in BAD_CONFIGS])
def test_bad_checkpoint_configs_on_every_backend(tmp_path, tiny_points_run, backend, name, edit, fragment):
    bad = tamper(tiny_points_run, tmp_path / "bad.safetensors", edit_config=edit)
    out = tmp_path / "s.npz"
    assert_clean_error(cli("sample", "--checkpoint", bad, "--backend", backend, "--steps", "2", "--out", out),
                       str(bad), fragment)
    assert_clean_error(cli("eval", "--bpd", "--checkpoint", bad, "--backend", backend), fragment)
    assert not out.exists()


def test_broken_config_json_names_the_file(tmp_path, tiny_points_run):
    from safetensors.numpy import load, save

    tensors = load((tiny_points_run / "model.safetensors").read_bytes())
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(save(tensors, metadata={"hold_mlx": "{not json"}))
    assert_clean_error(cli("sample", "--checkpoint", bad, "--out", tmp_path / "s.npz"), str(bad), "not valid JSON")
    assert_clean_error(cli("export", "--checkpoint", bad, "--out", tmp_path / "m.onnx"), str(bad))


BAD_SAMPLE = [
    (["--threads", "100000"], "--threads"),
    (["--backend", "torch", "--threads", "100000"], "--threads"),
    (["--backend", "onnx", "--threads", "100000"], "--threads"),
    (["--steps", "100000000000"], "--steps"),
    (["--n", "100000000000"], "--n"),
    (["--batch-size", "1000000000", "--n", "1000000000"], "GiB"),
    (["--out", "x.txt"], "--out"),
    (["--seed", "-1"], "--seed"),
    (["--sampler", "poisson-midpoint", "--substeps", "1000000000"], "--substeps"),
    (["--sampler", "ams", "--snr", "nan"], "--snr"),
    (["--backend", "torch", "--device", "nope"], "--device"),
    (["--backend", "onnx"], "not an ONNX model"),
]


@pytest.mark.parametrize("extra,fragment", BAD_SAMPLE, ids=[" ".join(a) for a, _ in BAD_SAMPLE])
def test_bad_sample_values(tmp_path, tiny_points_run, extra, fragment):
    start = time.time()
    assert_clean_error(cli("sample", "--checkpoint", tiny_points_run, *extra), fragment)
    assert time.time() - start < 10


@pytest.mark.parametrize("extra,fragment", [
    (["--rtol", "nan"], "--rtol"), (["--rtol", "-1"], "--rtol"), (["--atol", "-1"], "--atol"),
    (["--atol", "inf"], "--atol"), (["--threads", "100000"], "--threads"),
    (["--quality", "--n-samples", "100000000000"], "--n"), (["--steps", "100000000000"], "--steps")])
def test_bad_eval_values(tiny_points_run, extra, fragment):
    assert_clean_error(cli("eval", "--bpd", "--checkpoint", tiny_points_run, *extra), fragment)


def test_bad_samples_file_for_eval(tmp_path, tiny_points_run):
    junk = tmp_path / "junk.npz"
    junk.write_text("junk")
    base = ["eval", "--quality", "--checkpoint", tiny_points_run]
    assert_clean_error(cli(*base, "--samples", junk), str(junk), "not a readable .npz")
    nan = tmp_path / "nan.npz"
    np.savez(nan, samples=np.full((10, 2), np.nan, np.float32))
    assert_clean_error(cli(*base, "--samples", nan), str(nan), "NaN")
    other = tmp_path / "other.npz"
    np.savez(other, x=1)
    assert_clean_error(cli(*base, "--samples", other), "no 'samples' array")


# ----------------------------------------------------------------------------- 8. paths from a checkpoint


def test_eval_never_opens_a_path_stored_in_a_checkpoint(tmp_path, tiny_points_run, points_file):
    bad = tamper(tiny_points_run, tmp_path / "root.safetensors", edit_config=lambda c: c["data"].update(name="/"))
    start = time.time()
    assert_clean_error(cli("eval", "--bpd", "--checkpoint", bad), "'/'", "--dataset")
    assert time.time() - start < 10
    # A model trained from a .npy: eval names the file and asks for it instead of "unknown dataset".
    run = tmp_path / "npyrun"
    assert cli("train", "--dataset", points_file, "--out", run, "--steps", "1", "--batch-size", "8",
               "--no-compile", "--sample-steps", "2").exit_code == 0
    assert_clean_error(cli("eval", "--bpd", "--checkpoint", run), str(points_file), "--dataset")
    ok = cli("eval", "--bpd", "--checkpoint", run, "--dataset", points_file, "--n-images", "4", "--rtol", "1e-2",
             "--atol", "1e-2")
    assert ok.exit_code == 0, ok.output


# ----------------------------------------------------------------------------- 11. network from the data


def test_default_network_follows_the_data(tmp_path, points_file):
    result = cli("train", "--dataset", points_file, "--out", tmp_path / "x", "--steps", "1", "--batch-size", "8",
                 "--no-compile", "--sample-steps", "2")
    assert result.exit_code == 0, result.output
    from hold_mlx.checkpoint import read_config

    assert read_config(tmp_path / "x")["net"]["kind"] == "mlp"
    from hold_mlx.data import load_dataset
    from hold_mlx.trainloop import auto_net

    assert auto_net(load_dataset("digits")) == "digits"
    assert auto_net(load_dataset("8gaussians", toy_size=10)) == "mlp"
    assert "auto" in cli("train", "--help").output


# ----------------------------------------------------------------------------- 10. Python API


def test_python_api_names_wrong_shape_and_backend():
    import hold_mlx

    model = hold_mlx.load()
    sde = model.sde
    with pytest.raises(ValueError, match=r"shape \(2, 8, 8, 1\).*\(28, 28, 1\)"):
        hold_mlx.sample(sde, model, (2, 8, 8, 1), steps=2)
    with pytest.raises(ValueError, match="mlx arrays but backend='torch'.*backend='mlx'"):
        hold_mlx.sample(sde, model, (2, 28, 28, 1), steps=2, backend="torch")
    with pytest.raises(ValueError, match="shape must be"):
        hold_mlx.sample(sde, model, (0, 28, 28, 1), steps=2)


def test_nan_scores_are_refused_not_written(tmp_path, tiny_points_run, monkeypatch):
    import hold_mlx.model as model_module

    real_call = model_module.Model.__call__
    monkeypatch.setattr(model_module.Model, "__call__",
                        lambda self, u, t, labels=None: real_call(self, u, t, labels) * float("nan"))
    out = tmp_path / "s.png"
    assert_clean_error(cli("sample", "--checkpoint", tiny_points_run, "--steps", "2", "--n", "8", "--out", out),
                       "NaN or Inf", "nothing was written")
    assert not out.exists()


# ----------------------------------------------------------------------------- environment (subprocess)


@pytest.mark.parametrize("env", [{"HOLD_MLX_CACHE_MB": "abc"}, {"HOLD_MLX_CACHE_MB": "9" * 30},
                                 {"HOLD_MLX_THREADS": "-3"}, {"HOLD_MLX_THREADS": "100000"}])
def test_garbage_environment(env):
    version = subprocess.run([*HOLD, "--version"], capture_output=True, text=True, env={**os.environ, **env},
                             cwd=REPO, timeout=60)
    # --version configures nothing (the variables are read when a backend is configured)
    assert version.returncode == 0 and "Traceback" not in version.stderr and "hold-mlx" in version.stdout
    doctor = subprocess.run([*HOLD, "doctor"], capture_output=True, text=True, env={**os.environ, **env},
                            cwd=REPO, timeout=60)
    assert doctor.returncode == 0 and "Traceback" not in doctor.stderr and list(env)[0] in doctor.stdout
    sample = run_cli("sample", "--n", "2", "--steps", "2", "--out", "/tmp/never.png", check=False, env=env)
    assert_clean_error(sample, list(env)[0])


def test_doctor_and_sample_with_a_missing_weights_path():
    env = {"HOLD_MLX_WEIGHTS": "/no/such/model.safetensors"}
    doctor = run_cli("doctor", env=env)
    assert "HOLD_MLX_WEIGHTS=/no/such/model.safetensors: no such file" in doctor.stdout
    assert_clean_error(run_cli("sample", "--n", "2", "--out", "/tmp/never.png", check=False, env=env),
                       "HOLD_MLX_WEIGHTS")


# ----------------------------------------------------------------------------- signals and kills


def _start_training(run: Path, steps=100_000) -> subprocess.Popen:
    proc = subprocess.Popen([*HOLD, "train", "--dataset", "8gaussians", "--net", "mlp-tiny", "--out", str(run),
                             "--steps", str(steps), "--batch-size", "8", "--save-every", "7", "--no-compile",
                             "--warmup", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    first = proc.stdout.readline()
    if not ("new run" in first or "resuming" in first):  # the loop is about to start
        proc.kill()
        raise AssertionError(first + proc.communicate()[1])
    return proc


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signals_save_and_exit_with_the_shell_code(tmp_path, sig, code):
    run = tmp_path / "sig"
    proc = _start_training(run)
    time.sleep(1.5)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == code, (out, err)
    assert "checkpoint saved" in out and "Traceback" not in err
    from hold_mlx.checkpoint import read_config

    assert read_config(run / "train_state.safetensors")["step"] > 0


def _kill_during_training(run: Path, kills: int, rng) -> int:
    survived = 0
    for _ in range(kills):
        proc = _start_training(run)
        time.sleep(float(rng.uniform(0.3, 1.5)))
        proc.kill()
        proc.wait()
        survived += 1
    return survived


def test_kill_9_during_training_then_resume(tmp_path):
    from hold_mlx.checkpoint import read_tensors

    run = tmp_path / "kill"
    _kill_during_training(run, 2, np.random.default_rng(0))
    state, config = read_tensors(run / "train_state.safetensors")  # checksum verified
    model, model_config = read_tensors(run / "model.safetensors")
    assert model_config["step"] <= config["step"]  # the model never runs ahead of the state
    steps = [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()]
    assert steps == sorted(steps)
    proc = _start_training(run, steps=config["step"] + 3)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert read_tensors(run / "model.safetensors")[1]["step"] == config["step"] + 3


@pytest.mark.slow
def test_many_kills_during_training(tmp_path):
    from hold_mlx.checkpoint import read_tensors

    run = tmp_path / "kills"
    assert _kill_during_training(run, 10, np.random.default_rng(1)) == 10
    _, config = read_tensors(run / "train_state.safetensors")
    assert read_tensors(run / "model.safetensors")[1]["step"] <= config["step"]


def _kill_during_writes(args: list, out: Path, kills: int, seed: int, check) -> None:
    """Write ``out`` with ``hold-mlx ARGS`` once, then start the same command again and kill -9 it
    at random times: ``out`` is always the old file or a complete new one (``check(out)``)."""
    run_cli(*args)
    command = [*HOLD, *map(str, args)]
    rng = np.random.default_rng(seed)
    for _ in range(kills):
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO)
        time.sleep(float(rng.uniform(0.5, 3.0)))
        proc.kill()
        proc.wait()
        check(out)


def test_kill_9_during_sample_write(tmp_path, tiny_points_run):
    out = tmp_path / "s.npz"
    _kill_during_writes(["sample", "--checkpoint", tiny_points_run, "--n", "500", "--steps", "3", "--out", out], out,
                        2, 0, lambda path: np.testing.assert_equal(np.load(path)["samples"].shape, (500, 2)))


@pytest.mark.slow
def test_kill_9_during_export_write(tmp_path, tiny_run):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    out = tmp_path / "m.onnx"
    _kill_during_writes(["export", "--checkpoint", tiny_run, "--out", out], out, 4, 2, lambda path: onnx.load(str(path)))


@pytest.mark.slow
def test_bad_onnx_metadata(tmp_path, tiny_run):
    pytest.importorskip("onnxruntime")
    import onnx

    good = tmp_path / "m.onnx"
    run_cli("export", "--checkpoint", tiny_run, "--out", good)
    model = onnx.load(str(good))
    for prop in model.metadata_props:
        if prop.key == "hold_mlx.config.data":
            config = json.loads(prop.value)
            config["kind"] = "video"
            prop.value = json.dumps(config)
            break
    else:
        raise AssertionError("no data section in the ONNX metadata")
    bad = tmp_path / "bad.onnx"
    onnx.save(model, str(bad))
    assert_clean_error(cli("sample", "--backend", "onnx", "--checkpoint", bad, "--out", tmp_path / "s.npz"),
                       "data.kind")
