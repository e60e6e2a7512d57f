"""The score networks' architecture, described once as data (no framework imports).

``net_plan(cfg)`` turns a :class:`~hold_mlx.netconfig.NetConfig` into an ordered list of layers:
what each one is, its checkpoint name, its channels and resolution, and how the forward pass
wires it (skip connections, SiLU before it, residual add). The MLX net (``hold_mlx.nets``), the
torch net (``hold_export.torch_nets``) and the analytic FLOP count (``hold_export.flops``) all
iterate this plan; each framework only knows how to build and call one layer of each kind.

A layer's ``name`` is its checkpoint key prefix ("down.1.0" holds "down.1.0.conv1.weight", ...):
the builders place modules by it, so changing a name here changes the checkpoint format.

Each framework supplies the module of each kind (built with ``module_args``) and ``run`` (one
layer's forward pass); ``embed`` and ``run_body`` here wire them, the same for every framework.
"""

from __future__ import annotations

from dataclasses import dataclass

from .netconfig import NetConfig

__all__ = ["KINDS", "Layer", "EmbeddingTerm", "NetPlan", "net_plan", "unet_plan", "mlp_plan", "module_args",
           "find_layer", "place_layer", "embed", "run_body", "net_labels"]

#: Every layer kind, with what its module computes (each framework has one module per kind).
KINDS = {
    "fourier": "Gaussian Fourier features of log t, [sin, cos](2 pi W log t); W is a frozen buffer",
    "linear": "Linear(c_in, c_out) on the last axis",
    "conv": "Conv2d(c_in, c_out, 3x3, stride 1, padding 1)",
    "norm_silu": "GroupNorm(min(groups, c), c, eps 1e-6) followed by SiLU",
    "resblock": "GN-SiLU-conv, + Linear(SiLU(emb)), GN-SiLU-dropout-conv(zero), + skip (1x1 conv "
                "if c_in != c_out); times 1/sqrt 2",
    "attention": "single-head self-attention over the pixels (GN, qkv, proj(zero)), residual; times 1/sqrt 2",
    "downsample": "Conv2d(c, c, 3x3, stride 2, padding 1): size -> size / 2",
    "upsample": "nearest 2x upsampling, then Conv2d(c, c, 3x3): size -> 2 size",
    "embedding": "Embedding(c_in, c_out): one learned row per class label; row c_in - 1 is the 'no label' class",
}


@dataclass(frozen=True)
class Layer:
    """One module of a score network and how the forward pass wires it."""

    kind: str  # a key of KINDS
    name: str  # checkpoint key prefix, "."-separated ("time_in", "down.1.0")
    c_in: int  # input channels (features), including any concatenated skip
    c_out: int
    size: int = 0  # input height = width in pixels; 0 for feature vectors
    skip_in: int = 0  # channels popped from the skip stack and concatenated to the input
    skip_out: bool = False  # the output is pushed on the skip stack
    act_in: bool = False  # SiLU on the input first
    residual: bool = False  # output = input + layer(input)
    add_embedding: bool = False  # the embedding is added to the output
    zero_init: bool = False  # weights and bias start at zero (the net starts as the zero function)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown layer kind {self.kind!r}; add it to hold_mlx.netplan.KINDS")

    @property
    def path(self) -> tuple:
        """The name as attribute / list-index steps: "down.1.0" -> ("down", 1, 0)."""
        first, *rest = self.name.split(".")
        return (first, *(int(i) for i in rest))

    @property
    def size_out(self) -> int:
        return {"downsample": self.size // 2, "upsample": 2 * self.size}.get(self.kind, self.size)


@dataclass(frozen=True)
class EmbeddingTerm:
    """One summand of the conditioning embedding: a chain of layers applied to one network input."""

    input: str  # the network argument it reads: "t" (the time) or "label" (integer class labels)
    layers: tuple[Layer, ...]


@dataclass(frozen=True)
class NetPlan:
    kind: str  # "unet" | "mlp"
    emb_dim: int  # features of the embedding every term produces
    groups: int  # GroupNorm groups (min(groups, channels) per norm)
    dropout: float
    fourier_scale: float
    embedding: tuple[EmbeddingTerm, ...]  # summed into emb
    body: tuple[Layer, ...]  # u -> output, in order

    @property
    def layers(self) -> tuple[Layer, ...]:
        """Every layer in construction order (embedding first): the order parameters are drawn in."""
        return tuple(layer for term in self.embedding for layer in term.layers) + self.body


def net_plan(cfg: NetConfig) -> NetPlan:
    return unet_plan(cfg) if cfg.kind == "unet" else mlp_plan(cfg)


def module_args(layer: Layer, plan: NetPlan) -> tuple:
    """The positional constructor arguments of ``layer``'s module, the same in every framework."""
    return {
        "fourier": (layer.c_out, plan.fourier_scale),
        "linear": (layer.c_in, layer.c_out),
        "conv": (layer.c_in, layer.c_out, 3, 1, 1),  # kernel size, stride, padding
        "norm_silu": (layer.c_in, plan.groups),
        "resblock": (layer.c_in, layer.c_out, plan.emb_dim, plan.dropout, plan.groups),
        "attention": (layer.c_in, plan.groups),
        "downsample": (layer.c_in,),
        "upsample": (layer.c_in,),
        "embedding": (layer.c_in, layer.c_out),
    }[layer.kind]


def _plan(cfg: NetConfig, emb_dim: int, embedding, body) -> NetPlan:
    """Both nets' plans end here: an embedding term added to ``embedding`` (another network input
    mapped to ``emb_dim`` features) conditions the U-Net and the MLP alike. A class-conditional net
    (``num_classes`` > 0) adds a learned label embedding with num_classes + 1 rows (the last one is
    "no label", which classifier-free guidance and label dropout use) to the time embedding."""
    if cfg.num_classes:
        embedding = [*embedding, EmbeddingTerm("label", (Layer("embedding", "label_emb", cfg.num_classes + 1,
                                                               emb_dim),))]
    return NetPlan(cfg.kind, emb_dim, cfg.groups, cfg.dropout, cfg.fourier_scale, tuple(embedding), tuple(body))


def unet_plan(cfg: NetConfig) -> NetPlan:
    """DDPM++-style U-Net, input n*C channels, output C channels:

      time: Fourier(ch) -> Linear(ch, 4ch) -> SiLU -> Linear(4ch, 4ch)
      conv_in; down[level] = [ResBlock (+Attention)] x num_res_blocks (+ Downsample)
      mid = ResBlock, Attention, ResBlock
      up[level] = [ResBlock on concat skip (+Attention)] x (num_res_blocks + 1) (+ Upsample)
      norm_out (GroupNorm + SiLU) -> conv_out (zero-initialised)

    The skip stack holds conv_in's output and every down ResBlock's (before its Attention) and
    Downsample's; each up ResBlock pops one.
    """
    ch, emb_dim = cfg.channels, 4 * cfg.channels
    time = EmbeddingTerm("t", (Layer("fourier", "time_features", 1, ch),
                               Layer("linear", "time_in", ch, emb_dim),
                               Layer("linear", "time_out", emb_dim, emb_dim, act_in=True)))
    body, skips, filled = [], [], {}
    c, size = cfg.order * cfg.data_channels, cfg.image_size

    def slot(group: str) -> str:
        """The next free name in a module list: "down.1" -> "down.1.0", "down.1.1", ..."""
        filled[group] = filled.get(group, -1) + 1
        return f"{group}.{filled[group]}"

    def add(kind, name, c_out, **wiring):
        """Append a layer that reads the current activation (and the skip it pops)."""
        nonlocal c, size
        layer = Layer(kind, name, c + wiring.get("skip_in", 0), c_out, size, **wiring)
        body.append(layer)
        c, size = c_out, layer.size_out
        if layer.skip_out:
            skips.append(c)

    def resblock_and_attention(group, c_out, **wiring):
        add("resblock", slot(group), c_out, **wiring)
        if size in cfg.attn_resolutions:
            add("attention", slot(group), c)

    add("conv", "conv_in", ch, skip_out=True)
    for level, mult in enumerate(cfg.channel_mult):
        for _ in range(cfg.num_res_blocks):
            resblock_and_attention(f"down.{level}", ch * mult, skip_out=True)
        if level != len(cfg.channel_mult) - 1:
            add("downsample", slot(f"down.{level}"), c, skip_out=True)
    add("resblock", "mid.0", c)
    add("attention", "mid.1", c)
    add("resblock", "mid.2", c)
    for up, mult in enumerate(reversed(cfg.channel_mult)):
        for _ in range(cfg.num_res_blocks + 1):
            resblock_and_attention(f"up.{up}", ch * mult, skip_in=skips.pop())
        if up != len(cfg.channel_mult) - 1:
            add("upsample", slot(f"up.{up}"), c)
    add("norm_silu", "norm_out", c)
    add("conv", "conv_out", cfg.data_channels, zero_init=True)
    return _plan(cfg, emb_dim, [time], body)


def mlp_plan(cfg: NetConfig) -> NetPlan:
    """Points in R^d: h = Linear(u) + emb; h += Linear(SiLU h) x depth; output Linear(SiLU h) (zero).

    time: Fourier(width) -> Linear(width, width).
    """
    width, d = cfg.hidden, cfg.data_channels
    time = EmbeddingTerm("t", (Layer("fourier", "time_features", 1, width), Layer("linear", "time_in", width, width)))
    body = [Layer("linear", "inp", cfg.order * d, width, add_embedding=True)]
    body += [Layer("linear", f"layers.{i}", width, width, act_in=True, residual=True) for i in range(cfg.depth)]
    body.append(Layer("linear", "out", width, d, act_in=True, zero_init=True))
    return _plan(cfg, width, [time], body)


def find_layer(root, layer: Layer):
    """The module at ``layer.name`` in a module tree of attributes and lists (MLX or torch)."""
    node = getattr(root, layer.path[0])
    for index in layer.path[1:]:
        node = node[index]
    return node


def place_layer(root, layer: Layer, module, new_list=list) -> None:
    """Put ``module`` at ``layer.name`` in ``root``, creating the lists on its path with ``new_list``.

    Plan order fills every list front to back, so each module is appended; anything else is a
    plan whose names skip or repeat an index, refused here rather than saved under a wrong key.
    """
    first, *indices = layer.path
    if not indices:
        setattr(root, first, module)
        return
    if not hasattr(root, first):
        setattr(root, first, new_list())
    node = getattr(root, first)
    for depth, index in enumerate(indices):
        leaf = depth == len(indices) - 1
        if index == len(node):
            node.append(module if leaf else new_list())
        elif leaf or index > len(node):
            raise ValueError(f"plan layer {layer.name!r} is out of order (its list has {len(node)} entries)")
        node = node[index]


def embed(plan: NetPlan, run, inputs: dict):
    """The embedding: each term's layers applied in turn to its input (``inputs[term.input]``), summed.

    ``run(layer, x, emb)`` is the framework's forward pass of one layer (here ``emb`` is None)."""
    emb = None
    for term in plan.embedding:
        e = inputs[term.input]
        for layer in term.layers:
            e = run(layer, e, None)
        emb = e if emb is None else emb + e
    return emb


def run_body(plan: NetPlan, run, concat, u, emb):
    """The network's output for input ``u`` and embedding ``emb``: the body's layers in order.

    ``run(layer, x, emb)`` runs one layer (SiLU on ``x`` first if ``layer.act_in``);
    ``concat(h, skip)`` joins two activations along the channel axis."""
    h, skips = u, []
    for layer in plan.body:
        x = concat(h, skips.pop()) if layer.skip_in else h
        y = run(layer, x, emb)
        h = h + y if layer.residual else y
        if layer.add_embedding:
            h = h + emb
        if layer.skip_out:
            skips.append(h)
    return h


def net_labels(cfg: NetConfig, label, batch: int, full):
    """The labels a net embeds: ``label`` itself, the "no label" class for every sample when it is
    None (``full(shape, value)`` makes the array), nothing for an unconditional net (which refuses labels)."""
    if not cfg.num_classes:
        if label is not None:
            raise ValueError("this network is unconditional (num_classes 0); it takes no class labels")
        return None
    return full((batch,), cfg.null_label) if label is None else label
