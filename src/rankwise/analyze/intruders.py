"""Intruder dimensions: new high-ranking singular directions a fine-tune brings into a weight.

Paper: Shuttleworth, Andreas, Torralba & Sharma, "LoRA vs Full Fine-tuning: An Illusion of
Equivalence", arXiv 2410.21228. With the thin SVDs ``W0 = U0 S0 V0^T`` (base) and
``W1 = U1 S1 V1^T`` (tuned), the i-th left singular vector of ``W1`` is an *intruder* when it
is nearly orthogonal to every base left singular vector::

    intruder(i)  <=>  max_j |<U1[:, i], U0[:, j]>| < epsilon,      i = 1 .. k

counted over the top ``k`` (10) directions of ``W1`` with ``epsilon = 0.5``. LoRA updates
create such directions; full fine-tuning mostly rotates existing ones.

Mitigation (the paper's section 6, as PEFT's ``reduce_intruder_dimension`` does it): scale
the intruder components of the tuned matrix by ``lambda``::

    W1' = W1 + (lambda - 1) sum_{i intruder} S1[i] U1[:, i] V1[:, i]^T,     lambda = 0.75

Deviation from PEFT: PEFT then re-factorises ``W1' - W0`` to the adapter's rank (a further
truncation); :func:`mitigate_intruders` writes ``W1'`` into the dense weight and keeps it
exact, so a model holding adapters is refused (merge them with ``rankwise.unload`` first).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from rankwise.analyze.core import DIAGNOSTICS, UpdateDiagnostic
from rankwise.analyze.selection import layer_matrix, paired_layers
from rankwise.analyze.spectrum import MatrixLike, as_matrix
from rankwise.errors import RankwiseError
from rankwise.layers import is_linear_like, is_quantized, layer_kind
from rankwise.linalg.svd import svd
from rankwise.options import Option
from rankwise.targets import Targets

TOP_K = Option(10, int, low=1, help="how many top singular directions of the tuned matrix are examined")
EPSILON = Option(0.5, float, low=0.0, high=1.0, low_open=True,
                 help="a direction is an intruder when its largest |cosine| with the base's is below this")
LAMBDA = Option(0.75, float, low=0.0, help="factor applied to the intruder components (1 = unchanged)")


@dataclass(frozen=True)
class Intruders:
    """The intruder directions among the top ``k`` of a tuned matrix; ``float()`` is the count."""

    count: int
    indices: tuple[int, ...]
    similarities: tuple[float, ...]  # max_j |cos(U1[:, i], U0[:, j])| for i = 0 .. k-1

    def __float__(self) -> float:
        return float(self.count)


def _pair(base: MatrixLike, tuned: MatrixLike) -> tuple[torch.Tensor, torch.Tensor]:
    w0, w1 = as_matrix(base), as_matrix(tuned)
    if w0.shape != w1.shape:
        raise RankwiseError(f"base and tuned matrices differ in shape: {tuple(w0.shape)} vs {tuple(w1.shape)}")
    return w0, w1


def _find(w0: torch.Tensor, w1: torch.Tensor, k: int, epsilon: float):
    u0, _, _ = svd(w0)
    u1, s1, vh1 = svd(w1.to(u0.dtype))
    k = min(k, s1.numel())
    similarities = (u1[:, :k].T @ u0).abs().max(dim=1).values
    indices = torch.nonzero(similarities < epsilon).flatten()
    return indices, similarities, (u1, s1, vh1)


def intruder_dimensions(base: MatrixLike, tuned: MatrixLike, k: int = 10, epsilon: float = 0.5) -> Intruders:
    """The intruder directions of ``tuned`` w.r.t. ``base`` (2-D tensors or layers of one shape):
    the top-``k`` left singular vectors of ``tuned`` whose largest |cosine| with any left singular
    vector of ``base`` is below ``epsilon``."""
    k = TOP_K.check("k", k, owner="intruder_dimensions")
    epsilon = EPSILON.check("epsilon", epsilon, owner="intruder_dimensions")
    indices, similarities, _ = _find(*_pair(base, tuned), k, epsilon)
    return Intruders(len(indices), tuple(int(i) for i in indices), tuple(float(s) for s in similarities))


def mitigated_weight(base: MatrixLike, tuned: MatrixLike, lam: float = 0.75, k: int = 10,
                     epsilon: float = 0.5) -> tuple[torch.Tensor, int]:
    """``(W1', count)``: ``tuned`` with its intruder components scaled by ``lam`` (module docstring), in
    the SVD's compute dtype, and how many components were scaled."""
    lam = LAMBDA.check("lam", lam, owner="mitigate_intruders")
    k = TOP_K.check("k", k, owner="mitigate_intruders")
    epsilon = EPSILON.check("epsilon", epsilon, owner="mitigate_intruders")
    w0, w1 = _pair(base, tuned)
    indices, _, (u1, s1, vh1) = _find(w0, w1, k, epsilon)
    w1 = w1.to(u1.dtype)
    if len(indices) == 0:
        return w1, 0
    intruding = (u1[:, indices] * s1[indices]) @ vh1[indices]
    return w1 + (lam - 1.0) * intruding, len(indices)


def mitigate_intruders(model: nn.Module, base: nn.Module, lam: float = 0.75, *, k: int = 10,
                       epsilon: float = 0.5, targets: Targets = "all-linear") -> dict[str, int]:
    """Scale the intruder components of every layer of the fine-tuned ``model`` by ``lam``, in place,
    against the same layers of ``base``; returns ``{layer: components scaled}``.

    Every layer is checked and every new weight computed before any is written, so a RankwiseError
    (adapter or quantized layers, mismatched models, bad options) leaves ``model`` unchanged.
    """
    names = paired_layers(base, model, targets)
    new_weights: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    for name in names:
        module = model.get_submodule(name)
        if not is_linear_like(module) or is_quantized(module):
            what = layer_kind(module) or type(module).__name__
            raise RankwiseError(
                f"cannot write a mitigated weight into {name!r} ({what}); mitigate a dense model: merge adapters "
                "with rankwise.unload(model) (or factorised / quantized layers into nn.Linear) first"
            )
        weight, counts[name] = mitigated_weight(layer_matrix(base, name), layer_matrix(model, name), lam, k, epsilon)
        if counts[name]:
            new_weights[name] = weight
    with torch.no_grad():
        for name, weight in new_weights.items():
            module = model.get_submodule(name)
            stored = weight.T if layer_kind(module) == "conv1d" else weight  # Conv1D keeps W^T
            module.weight.copy_(stored.to(module.weight.dtype))
    return counts


@DIAGNOSTICS.register("intruder_dimensions", family="update",
                      paper="LoRA vs Full Fine-tuning: An Illusion of Equivalence", arxiv="2410.21228")
class IntruderDimensions(UpdateDiagnostic):
    OPTIONS = {"k": TOP_K, "epsilon": EPSILON}

    def measure(self, base: torch.Tensor, tuned: torch.Tensor) -> float:
        return float(intruder_dimensions(base, tuned, self.options["k"], self.options["epsilon"]).count)
