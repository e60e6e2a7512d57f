"""The score parameterisation, owned once: what the network predicts and how score and loss follow.

Block-coordinate (hybrid) score matching (docs/math.md §3). With u_t = A x0 + L eps (per data
dimension, A = mean_coeff, L = lower Cholesky factor of the hybrid-start covariance), the
conditional score of the last block is -eps_n / ell_t, ell_t = L[n, n]. The network predicts
alpha; the score is

    s(u, t) = a(t) alpha(u, t) + b(t) u_n,   a = -1/ell_t,   b = -1/Sigma^mix_nn (0 without it),

where the optional mixed term adds the exact score of a Gaussian (docs/math.md §3). Training minimises
a weighting of || alpha + mixed u_n - eps_n ||^2, mixed = ell_t / Sigma^mix_nn:
  "eps":        weight 1  (CLD's reweightedv2)
  "likelihood": weight beta(t) sigma^2 / ell_t^2  (maximum-likelihood weighting).

:class:`ScoreParameterisation` computes these float64 coefficients from the SDE and assembles the
score and the loss with nothing but the array operations a backend has (arithmetic, ``reshape``,
``backend.per_sample``, ``backend.concat``), so the sampling score on MLX, torch and onnxruntime
and the training loss on MLX and torch are this one code.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .sde import LinearSDE

__all__ = ["WEIGHTINGS", "OUTPUTS", "Coefficients", "ScoreParameterisation", "objective_coefficients",
           "sample_times", "perturb", "residual"]

WEIGHTINGS = ("eps", "likelihood")
#: What a network can predict (the checkpoint's objective.output).
OUTPUTS = ("alpha",)


@dataclass
class Coefficients:
    """Per-sample float64 coefficients for one training batch."""

    t: np.ndarray  # (B,)
    mean: np.ndarray  # (B, n): first column of A(t), since the auxiliaries start at mean 0
    chol: np.ndarray  # (B, n, n) lower Cholesky factor of Sigma_t
    mixed: np.ndarray  # (B,) coefficient of u_n in the alpha-space residual (0 if not mixed)
    weight: np.ndarray  # (B,) loss weight

    def as_float32(self) -> dict[str, np.ndarray]:
        return {k: np.ascontiguousarray(getattr(self, k), dtype=np.float32)
                for k in ("t", "mean", "chol", "mixed", "weight")}


def sample_times(sde: LinearSDE, rng: np.random.Generator, batch: int) -> np.ndarray:
    """t ~ U[eps_loss, T]."""
    return sde.eps_loss + (sde.T - sde.eps_loss) * rng.random(batch)


class ScoreParameterisation:
    """Network output <-> score of the last block, for one SDE and one checkpoint's objective.

    ``objective`` is the checkpoint config's "objective" section (``mixed_score``, ``weighting``,
    ``output``). Extensions plug in here, not in the backends: a class-conditional model gets its
    ``labels`` and classifier-free ``guidance`` through :meth:`score` (conditional and "no label"
    rows in one network call on a doubled batch); a data prediction x0_hat(u, t) for few-step
    samplers is the score mapped by the SDE's float64 coefficients, a method next to :meth:`score`.
    """

    def __init__(self, sde: LinearSDE, objective: dict | None = None, data_channels: int | None = None,
                 num_classes: int = 0):
        objective = dict(objective or {})
        self.sde = sde
        self.output = objective.get("output", "alpha")
        if self.output not in OUTPUTS:
            raise ValueError(f"the network predicts {self.output!r}; this hold-mlx knows {', '.join(OUTPUTS)}: "
                             "upgrade hold-mlx")
        self.mixed_score = bool(objective.get("mixed_score", True))
        self.weighting = objective.get("weighting", "eps")
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"unknown weighting {self.weighting!r}; choose one of {', '.join(WEIGHTINGS)}")
        self.data_channels = None if data_channels is None else int(data_channels)
        self.num_classes = int(num_classes)  # 0: unconditional; label num_classes is "no label"

    @classmethod
    def from_config(cls, sde: LinearSDE, config: dict) -> "ScoreParameterisation":
        """From a checkpoint config (its "objective", the network's data channels and classes)."""
        net = config["net"]
        return cls(sde, config["objective"], int(net["data_channels"]), int(net.get("num_classes", 0)))

    # -- float64 coefficients -------------------------------------------------------------------

    def score_coefficients(self, t) -> tuple[np.ndarray, np.ndarray]:
        """(a, b) with score = a * alpha + b * u_n, per time: a = -1/ell_t, b = -1/Sigma^mix_nn.

        Samplers pass one time for the whole batch, so the float64 kernel is computed once per
        distinct time and broadcast back.
        """
        times, index = np.unique(np.atleast_1d(np.asarray(t, dtype=np.float64)), return_inverse=True)
        ell = self.sde.perturbation(times).ell
        b = -1.0 / self.sde.mixed_score_var(times) if self.mixed_score else np.zeros_like(times)
        return (-1.0 / ell)[index], b[index]

    def training_coefficients(self, t) -> Coefficients:
        """Perturbation kernel, residual's mixed coefficient and loss weight at training times t."""
        sde = self.sde
        t = np.asarray(t, dtype=np.float64)
        k = sde.perturbation(t)
        ell = k.ell
        mixed = ell / sde.mixed_score_var(t) if self.mixed_score else np.zeros_like(t)
        if self.weighting == "eps":
            weight = np.ones_like(t)
        else:
            weight = sde.beta(t) * sde.sigma**2 / ell**2
        return Coefficients(t, k.mean_coeff[:, :, 0], k.chol, mixed, weight)

    # -- backend arrays -------------------------------------------------------------------------

    def score(self, network, backend, u, t, labels=None, guidance: float = 0.0):
        """s(u, t) of the last block from ``network(u, t)`` (its output, shaped like one block).

        ``backend`` supplies ``to_numpy`` (the times, for the float64 coefficients) and
        ``per_sample``; everything else is arithmetic every array framework shares.

        A class-conditional model takes ``labels`` (B,) (NumPy or backend integers; None: the
        unconditional score, the "no label" class). With ``guidance`` w != 0 the score is
        classifier-free guided, (1 + w) s(u, t, y) - w s(u, t, no label): both terms come from ONE
        network call on the batch doubled (so one NFE costs two network passes per sample), and
        since the score is affine in the network output the mix is taken on that output.
        """
        if labels is not None:
            if isinstance(labels, np.ndarray):  # backend arrays come checked (``Model.conditioned``)
                self.check_labels(labels)
                labels = backend.asindex(labels)
            elif not self.num_classes:
                self.check_labels(np.zeros(0, np.int64))  # refuses: the model is unconditional
        elif guidance:
            raise ValueError("guidance needs class labels: pass labels= (one per sample)")
        if labels is None:
            out = network(u, t)
        elif not guidance:
            out = network(u, t, labels)
        else:
            rows = u.shape[0]
            null = backend.asindex(np.full(rows, self.num_classes))
            both = network(backend.concat_batch([u, u]), backend.concat_batch([t, t]),
                           backend.concat_batch([labels, null]))
            w = float(guidance)
            out = (1.0 + w) * both[:rows] - w * both[rows:]
        a, b = self.score_coefficients(backend.to_numpy(t))
        score = backend.per_sample(a, u.ndim) * out
        if self.mixed_score:
            width = self.data_channels or u.shape[-1] // self.sde.order
            score = score + backend.per_sample(b, u.ndim) * u[..., -width:]
        return score

    def check_labels(self, labels: np.ndarray) -> None:
        """Refuse labels an unconditional model, or this model's classes, cannot take."""
        labels = np.asarray(labels)
        if not self.num_classes:
            raise ValueError("this model is unconditional (trained without --conditional); it takes no class labels")
        if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"labels must be integers, one per sample; got dtype {labels.dtype}, shape {labels.shape}")
        if labels.size and (labels.min() < 0 or labels.max() > self.num_classes):
            bad = labels[(labels < 0) | (labels > self.num_classes)][0]
            raise ValueError(f"label {int(bad)} is out of range: this model has classes 0 to {self.num_classes - 1} "
                             f"(and {self.num_classes}: no label)")

    @staticmethod
    def weighted_errors(network, backend, x0, eps_blocks: list, t, mean, chol, mixed, weight, labels=None):
        """Per-sample weighted loss (B,): weight * mean || alpha + mixed u_n - eps_n ||^2.

        x0 (B, *data_shape), eps_blocks n arrays like x0, t / mixed / weight (B,), mean (B, n),
        chol (B, n, n): backend arrays, the coefficients from :meth:`training_coefficients`. The
        caller reduces over the batch (and splits or autocasts ``network`` as its framework likes).
        ``labels`` (B,): a class-conditional network's labels (label dropout already applied).
        """
        shape = (-1,) + (1,) * (x0.ndim - 1)

        def per_sample(col):
            return col.reshape(shape)

        blocks = perturb(x0, eps_blocks, mean, chol, per_sample)
        u = blocks[0] if len(blocks) == 1 else backend.concat(blocks)
        alpha = network(u, t) if labels is None else network(u, t, labels)
        r = residual(alpha, blocks[-1], eps_blocks[-1], mixed, per_sample)
        return weight * (r * r).reshape(r.shape[0], -1).mean(axis=1)


def objective_coefficients(sde: LinearSDE, t: np.ndarray, *, mixed_score: bool = True,
                           weighting: str = "eps") -> Coefficients:
    """:meth:`ScoreParameterisation.training_coefficients` for a model trained with these options."""
    return ScoreParameterisation(sde, {"mixed_score": mixed_score, "weighting": weighting}).training_coefficients(t)


def perturb(x0, eps_blocks: list, mean, chol, per_sample):
    """u_t blocks: u_i = mean_i x0 + sum_{j<=i} chol_ij eps_j (array-framework neutral).

    ``mean`` (B, n) and ``chol`` (B, n, n) are backend arrays; ``per_sample(col)`` reshapes a (B,)
    column to broadcast over a block.
    """
    n = len(eps_blocks)
    blocks = []
    for i in range(n):
        acc = per_sample(mean[:, i]) * x0
        for j in range(i + 1):
            acc = acc + per_sample(chol[:, i, j]) * eps_blocks[j]
        blocks.append(acc)
    return blocks


def residual(alpha, u_last, eps_last, mixed, per_sample):
    """alpha + mixed u_n - eps_n: zero exactly when the model's score is the conditional score."""
    return alpha + per_sample(mixed) * u_last - eps_last
