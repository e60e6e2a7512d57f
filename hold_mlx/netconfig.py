"""Score-network hyperparameters and presets (no framework imports: shared by MLX, torch, ONNX)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

__all__ = ["NetConfig", "NET_PRESETS", "net_preset", "NET_FIELD_RULES", "net_field_problems", "MAX_ORDER"]

#: Highest SDE order (number of blocks): the state grows with it and n > 8 is no model anyone trains.
MAX_ORDER = 8


def is_finite_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


_POSITIVE_INT = (lambda v: is_int(v) and v >= 1, "an integer >= 1")
#: What each NetConfig field may hold in a config (--net-param, a checkpoint): (test, description).
#: Checked before a network is built, so a bad value is named instead of failing inside MLX or torch.
NET_FIELD_RULES = {
    "kind": (lambda v: v in ("unet", "mlp"), '"unet" or "mlp"'),
    "data_channels": _POSITIVE_INT,
    "order": (lambda v: is_int(v) and 1 <= v <= MAX_ORDER, f"an integer from 1 to {MAX_ORDER}"),
    "image_size": _POSITIVE_INT,
    "channels": _POSITIVE_INT,
    "channel_mult": (lambda v: isinstance(v, (list, tuple)) and 1 <= len(v) <= 8
                     and all(is_int(c) and c >= 1 for c in v), "a list of 1 to 8 integers >= 1"),
    "num_res_blocks": _POSITIVE_INT,
    "attn_resolutions": (lambda v: isinstance(v, (list, tuple)) and all(is_int(c) and c >= 1 for c in v),
                         "a list of integers >= 1"),
    "dropout": (lambda v: is_finite_number(v) and 0 <= v < 1, "a number in [0, 1)"),
    "groups": _POSITIVE_INT,
    "fourier_scale": (lambda v: is_finite_number(v) and v > 0, "a finite number > 0"),
    "hidden": _POSITIVE_INT,
    "depth": _POSITIVE_INT,
    "num_classes": (lambda v: is_int(v) and 0 <= v <= 100_000, "an integer from 0 (unconditional) to 100000"),
}


def net_field_problems(params: dict) -> list[str]:
    """What is wrong with some NetConfig settings, one sentence each (empty: nothing)."""
    unknown = sorted(set(params) - set(NET_FIELD_RULES))
    if unknown:
        return [f"unknown network setting(s) {unknown}; known: {sorted(NET_FIELD_RULES)}"]
    return [f"{key} must be {NET_FIELD_RULES[key][1]}, got {value!r}"
            for key, value in params.items() if not NET_FIELD_RULES[key][0](value)]


@dataclass
class NetConfig:
    """Hyperparameters of a score network; stored in every checkpoint."""

    kind: str = "unet"  # "unet" | "mlp"
    data_channels: int = 1  # C: channels of one block (image) or d (points)
    order: int = 3  # n: the network sees n * C input channels
    image_size: int = 28
    channels: int = 32
    channel_mult: tuple[int, ...] = (1, 2, 2)
    num_res_blocks: int = 1
    attn_resolutions: tuple[int, ...] = ()
    dropout: float = 0.0
    groups: int = 8
    fourier_scale: float = 16.0
    hidden: int = 256  # MLP width
    depth: int = 4  # MLP hidden layers
    num_classes: int = 0  # class-conditional with this many classes (0: unconditional)

    def __post_init__(self):
        self.channel_mult = tuple(int(c) for c in self.channel_mult)
        self.attn_resolutions = tuple(int(r) for r in self.attn_resolutions)
        self.num_classes = int(self.num_classes)
        # the rules the rest of the config relies on (a checkpoint or --net-param gets every rule
        # checked before this, with the offending key named)
        problems = net_field_problems({"kind": self.kind, "num_classes": self.num_classes})
        if problems:
            raise ValueError("; ".join(problems))
        if self.kind == "unet":
            down = 2 ** (len(self.channel_mult) - 1)
            if self.image_size % down:
                raise ValueError(
                    f"image_size {self.image_size} must be divisible by {down} "
                    f"(channel_mult {self.channel_mult} has {len(self.channel_mult) - 1} downsamplings)"
                )
            for c in (self.channels * m for m in self.channel_mult):
                if c % self.groups:
                    raise ValueError(f"{c} channels are not divisible into {self.groups} GroupNorm groups")

    @property
    def null_label(self) -> int:
        """The label of the extra "no label" class (index num_classes) of a conditional net."""
        return self.num_classes

    def to_dict(self) -> dict:
        d = asdict(self)
        d["channel_mult"] = list(self.channel_mult)
        d["attn_resolutions"] = list(self.attn_resolutions)
        if not self.num_classes:  # unconditional configs stay as they were before labels existed
            del d["num_classes"]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "NetConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown network config key(s) {unknown}")
        return cls(**d)


#: Presets sized for their data. "cifar10" is CLD-SGM's published NCSN++ width/depth pattern
#: reduced to DDPM++ blocks (128 ch, 1,2,2,2, attention at 16^2, dropout 0.1).
NET_PRESETS: dict[str, dict] = {
    "tiny": dict(kind="unet", channels=16, channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), groups=4),
    "digits": dict(kind="unet", channels=32, channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,)),
    "fashion-mnist": dict(kind="unet", channels=32, channel_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(7,)),
    "cifar10": dict(kind="unet", channels=128, channel_mult=(1, 2, 2, 2), num_res_blocks=2,
                    attn_resolutions=(16,), dropout=0.1, groups=32),
    # Points: a low Fourier scale, so the time features vary smoothly over log t; with the image
    # nets' 16 a small MLP learned the 2-D toys 5x slower (tests/test_train.py measures it).
    "mlp": dict(kind="mlp", hidden=256, depth=4, fourier_scale=1.0),
    "mlp-tiny": dict(kind="mlp", hidden=64, depth=2, fourier_scale=1.0),
}


def net_preset(name: str, **overrides) -> NetConfig:
    if name not in NET_PRESETS:
        raise ValueError(f"unknown network preset {name!r}; choose one of {', '.join(NET_PRESETS)}")
    return NetConfig(**{**NET_PRESETS[name], **overrides})
