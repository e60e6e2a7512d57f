"""Checkpoints: bitwise round trips, atomic writes, and clear errors for every broken file."""

from __future__ import annotations

import errno
import json
import os
import shutil

import numpy as np
import pytest

import hold_mlx
from hold_mlx.checkpoint import (FORMAT_VERSION, MODEL_FILE, CheckpointError, atomic_write, read_config,
                                 read_tensors, write_tensors)


def test_save_load_round_trip_is_bitwise(tmp_path, tiny_run):
    from hold_mlx._mlx import mx
    from hold_mlx.model import flat_params

    model = hold_mlx.load(tiny_run)
    sde, config = model.sde, model.config
    assert sde.name == "hold" and sde.order == 3 and config["step"] == 4
    hold_mlx.save(tmp_path / "copy.safetensors", model, config)
    again = hold_mlx.load(tmp_path / "copy.safetensors")
    config2 = again.config
    a, b = flat_params(model.net.parameters()), flat_params(again.net.parameters())
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == np.float32
        np.testing.assert_array_equal(a[k], b[k])
    assert config2 == config
    u = mx.array(np.random.default_rng(0).standard_normal((3, 8, 8, 3)).astype(np.float32))
    t = mx.array(np.array([0.01, 1.0, 4.0], np.float32))
    np.testing.assert_array_equal(np.array(model(u, t)), np.array(again(u, t)))


def test_truncated_checkpoint(tmp_path, tiny_run):
    path = tmp_path / MODEL_FILE
    data = (tiny_run / MODEL_FILE).read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        hold_mlx.load(path)


def test_not_a_hold_mlx_file(tmp_path):
    from safetensors.numpy import save_file

    save_file({"w": np.zeros(3, np.float32)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(CheckpointError, match="without a hold-mlx config"):
        hold_mlx.load(tmp_path / "other.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x05")
    with pytest.raises(CheckpointError, match="too short|not a readable"):
        read_config(tmp_path / "junk.safetensors")


def test_wrong_format_version_and_layout(tmp_path, tiny_run):
    tensors, config = read_tensors(tiny_run / MODEL_FILE)
    write_tensors(tmp_path / "v.safetensors", tensors, {**config, "format_version": FORMAT_VERSION + 1})
    with pytest.raises(CheckpointError, match="format"):
        hold_mlx.load(tmp_path / "v.safetensors")
    write_tensors(tmp_path / "l.safetensors", tensors, {**config, "layout": "torch"})
    with pytest.raises(CheckpointError, match="layout"):
        hold_mlx.load(tmp_path / "l.safetensors")


def test_weights_that_do_not_match_the_config(tmp_path, tiny_run):
    tensors, config = read_tensors(tiny_run / MODEL_FILE)
    wider = {**config, "net": {**config["net"], "channels": 32, "groups": 8}}
    write_tensors(tmp_path / "w.safetensors", tensors, wider)
    with pytest.raises(CheckpointError, match="shape"):
        hold_mlx.load(tmp_path / "w.safetensors")
    missing = dict(tensors)
    missing.pop("conv_out.weight")
    write_tensors(tmp_path / "m.safetensors", missing, config)
    with pytest.raises(CheckpointError, match="missing.*conv_out.weight"):
        hold_mlx.load(tmp_path / "m.safetensors")
    bad_sde = {**config, "sde": {"name": "hold", "order": 0}}
    write_tensors(tmp_path / "s.safetensors", tensors, bad_sde)
    with pytest.raises(CheckpointError, match="invalid SDE"):
        hold_mlx.load(tmp_path / "s.safetensors")


def test_paths(tmp_path, tiny_run):
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        hold_mlx.load(tmp_path / "nothing")
    (tmp_path / "empty_run").mkdir()
    with pytest.raises(CheckpointError, match="has no model.safetensors"):
        hold_mlx.load(tmp_path / "empty_run")
    model = hold_mlx.load(tiny_run / MODEL_FILE)  # the file or its folder
    assert model.data_shape == (8, 8, 1)


def test_atomic_write_keeps_the_old_file_on_a_full_disk(tmp_path, monkeypatch):
    path = tmp_path / "state.bin"
    atomic_write(path, b"old contents")

    def full_disk(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(CheckpointError, match="No space left on device.*free disk space"):
        atomic_write(path, b"new contents that will not fit")
    assert path.read_bytes() == b"old contents"
    assert os.listdir(tmp_path) == ["state.bin"]  # no temporary file left


def test_config_json_is_readable_without_mlx(tiny_run):
    config = read_config(tiny_run)
    assert json.loads((tiny_run / "config.json").read_text()) == config
    assert config["objective"] == {"output": "alpha", "mixed_score": True, "weighting": "eps"}


def test_shipped_weights_override(tmp_path, tiny_run, monkeypatch):
    target = tmp_path / "w" / MODEL_FILE
    target.parent.mkdir()
    shutil.copy(tiny_run / MODEL_FILE, target)
    monkeypatch.setenv("HOLD_MLX_WEIGHTS", str(target))
    model = hold_mlx.load()
    assert model.data_shape == (8, 8, 1)


def test_atomic_write_gives_the_usual_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write(tmp_path / "f.bin", b"x")
    finally:
        os.umask(old)
    assert (os.stat(tmp_path / "f.bin").st_mode & 0o777) == 0o644


def test_config_schema_knows_every_network_setting():
    """The config rules and NetConfig name the same settings (a new field needs both)."""
    from dataclasses import fields

    from hold_mlx.netconfig import NET_FIELD_RULES, NetConfig

    assert set(NET_FIELD_RULES) == {f.name for f in fields(NetConfig)}
