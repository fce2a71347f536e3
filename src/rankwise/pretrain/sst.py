"""SST: Sparse Spectral Training -- every singular value trained, sampled singular vectors.

Zhao, Zhang, Li, Liu, Cannistraci, "Sparse Spectral Training and Inference on Euclidean and
Hyperbolic Neural Networks", arXiv 2405.15481. Each targeted ``out x in`` (``m x n``) layer is
stored as the SVD of its fresh dense weight and computes

    y = U diag(sigma) V^T x + b,   U: m x k,  sigma: k,  V: n x k,  k = min(m, n),

with

* all ``k`` singular values trained at every step (kept non-negative, ``sigma <- max(sigma, 0)``);
* only ``r`` singular-vector pairs ("active") trained at a time, sampled without replacement
  from ``p(i) = (1/k + sigma_i / sum_j sigma_j) / 2`` (a magnitude-weighted multinomial mixed
  with the uniform one); the other ``k - r`` pairs are frozen buffers without optimizer state;
* the enhanced gradient for the active vectors, ``dU_i = (dL/dW) V_i``, ``dV_i = (dL/dW)^T U_i``
  (the natural gradient without its ``sigma_i`` factor, so small singular directions are not
  starved), computed by one ``autograd.Function`` (:class:`ActiveSpectrum`);
* after every step the active vectors renormalised to unit length (the magnitude lives in
  ``sigma``);
* every ``resample_every`` steps ("an iteration") a new active set is sampled -- the active
  pairs move to the front, their optimizer state is reset, ``sigma``'s moments follow the
  permutation -- and after every ``iterations_per_round`` iterations ("a round", by default
  ``ceil(k / r)``: enough to visit every direction) the weight is re-decomposed,
  ``U diag(sigma) V^T = SVD(W)``, restoring orthogonality (all of the layer's optimizer state
  is reset then).

Trainable weights (those with optimizer state) per layer: ``r (m + n) + k``; stored:
``k (m + n + 1)``. The paper's memory-efficient implementation (active / frozen segments,
swapped at each sampling) is the one here.

Checked against the paper (the authors' code was not available here): the sampling law, the
enhanced gradient, the non-negativity, the unit-norm vectors, the periodic re-SVD. Our
choices: ``resample_every`` 200 and the round length ``ceil(k / r)`` (not verified against the
paper's runs); renormalising does not fold the vectors' norms into ``sigma``; ``sigma``'s
moments survive a resampling (reordered), not a re-SVD.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from rankwise.linalg.svd import svd
from rankwise.options import Option
from rankwise.pretrain.core import (
    PARAMETRISATIONS,
    DenseLayer,
    Parametrisation,
    ParametrisedLayer,
    bias_parameter,
    reset_optimizer_state,
    transform_moments,
)


class ActiveSpectrum(torch.autograd.Function):
    """``y = ((x V) * sigma) U^T`` with SST's enhanced gradients for ``U`` and ``V`` (module docstring)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, u: torch.Tensor, sigma: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        h = x @ v
        ctx.save_for_backward(x, u, sigma, v, h)
        return (h * sigma) @ u.T

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, u, sigma, v, h = ctx.saved_tensors
        back = grad_out @ u  # (..., r): dL/d(h * sigma)
        grad_x = (back * sigma) @ v.T if ctx.needs_input_grad[0] else None
        flat_grad, flat_h = grad_out.reshape(-1, grad_out.shape[-1]), h.reshape(-1, h.shape[-1])
        flat_back, flat_x = back.reshape(-1, back.shape[-1]), x.reshape(-1, x.shape[-1])
        grad_u = flat_grad.T @ flat_h if ctx.needs_input_grad[1] else None  # (dL/dW) V, no sigma factor
        grad_sigma = (flat_back * flat_h).sum(0) if ctx.needs_input_grad[2] else None
        grad_v = flat_x.T @ flat_back if ctx.needs_input_grad[3] else None  # (dL/dW)^T U
        return grad_x, grad_u, grad_sigma, grad_v


def sampling_probabilities(sigma: torch.Tensor) -> torch.Tensor:
    """SST's ``p(i) = (1/k + sigma_i / sum sigma) / 2``."""
    sigma = sigma.detach().float().clamp_min(0)
    total = sigma.sum()
    magnitude = sigma / total if total > 0 else torch.full_like(sigma, 1.0 / sigma.numel())
    return 0.5 * (1.0 / sigma.numel() + magnitude)


class SSTLinear(ParametrisedLayer, nn.Module):
    """``y = U diag(sigma) V^T x + b``; the first ``r`` pairs active (parameters), the rest frozen buffers."""

    def __init__(self, layer: DenseLayer, rank: int, sample_seed: int) -> None:
        super().__init__()
        self.in_features, self.out_features, self.rank = layer.in_features, layer.out_features, rank
        self.k = min(layer.in_features, layer.out_features)
        like = {"device": layer.device, "dtype": layer.dtype}
        self.u_active = nn.Parameter(torch.zeros(layer.out_features, rank, **like))
        self.v_active = nn.Parameter(torch.zeros(layer.in_features, rank, **like))
        self.sigma = nn.Parameter(torch.zeros(self.k, **like))
        self.register_buffer("u_frozen", torch.zeros(layer.out_features, self.k - rank, **like))
        self.register_buffer("v_frozen", torch.zeros(layer.in_features, self.k - rank, **like))
        self.register_buffer("sample_seed", torch.tensor(sample_seed, dtype=torch.int64, device=layer.device))
        self.register_buffer("iteration", torch.zeros((), dtype=torch.int64, device=layer.device))
        self.bias = bias_parameter(layer)
        self.decompose(layer.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = self.rank
        out = ActiveSpectrum.apply(x, self.u_active, self.sigma[:r], self.v_active)
        if self.k > r:
            out = out + ((x @ self.v_frozen) * self.sigma[r:]) @ self.u_frozen.T
        return out if self.bias is None else out + self.bias

    def dense_weight(self) -> torch.Tensor:
        u = torch.cat([self.u_active, self.u_frozen], dim=1)
        v = torch.cat([self.v_active, self.v_frozen], dim=1)
        return (u * self.sigma) @ v.T

    @torch.no_grad()
    def decompose(self, weight: torch.Tensor) -> None:
        """Set ``U, sigma, V`` to the thin SVD of ``weight`` (the order is fixed by :meth:`sample`)."""
        u, s, vh = svd(weight)
        self._assign(u, s, vh.T)

    @torch.no_grad()
    def _assign(self, u: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> None:
        r = self.rank
        self.u_active.copy_(u[:, :r])
        self.v_active.copy_(v[:, :r])
        self.u_frozen.copy_(u[:, r:])
        self.v_frozen.copy_(v[:, r:])
        self.sigma.copy_(s)

    @torch.no_grad()
    def sample(self) -> torch.Tensor:
        """Draw the next active set; move it to the front. Returns the permutation applied to ``sigma``."""
        generator = torch.Generator().manual_seed(int(self.sample_seed) + int(self.iteration))
        chosen = torch.multinomial(sampling_probabilities(self.sigma).cpu(), self.rank, replacement=False,
                                   generator=generator)
        rest = torch.ones(self.k, dtype=torch.bool)
        rest[chosen] = False
        order = torch.cat([chosen.sort().values, rest.nonzero().flatten()]).to(self.sigma.device)
        u = torch.cat([self.u_active, self.u_frozen], dim=1)[:, order]
        v = torch.cat([self.v_active, self.v_frozen], dim=1)[:, order]
        self._assign(u, self.sigma[order], v)
        self.iteration += 1
        return order

    @torch.no_grad()
    def project(self) -> None:
        """After a step: ``sigma >= 0`` and unit-length active singular vectors."""
        self.sigma.clamp_(min=0)
        for vectors in (self.u_active, self.v_active):
            vectors.div_(vectors.norm(dim=0, keepdim=True).clamp_min(torch.finfo(vectors.dtype).tiny))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, k={self.k}"


@PARAMETRISATIONS.register(
    "sst",
    family="spectral",
    paper="Sparse Spectral Training and Inference on Euclidean and Hyperbolic Neural Networks",
    arxiv="2405.15481",
)
class SST(Parametrisation):
    """All singular values and ``r`` sampled singular-vector pairs trained, re-SVD each round (module docstring)."""

    trains_linear_weights = False
    OPTIONS = {
        "resample_every": Option(200, int, low=1, help="steps between samplings of the active singular vectors"),
        "iterations_per_round": Option(None, int, low=1, nullable=True,
                                       help="samplings between re-SVDs of the weight; None = ceil(min(m, n) / rank)"),
        "seed": Option(None, int, nullable=True,
                       help="seed of the samplings (layer i uses seed + i); None = torch's global RNG"),
    }

    def __init__(self, rank: int | None = None, **options: Any) -> None:
        super().__init__(rank, **options)
        self._built = 0

    def layer_types(self) -> tuple[type, ...]:
        return (SSTLinear,)

    def build(self, layer: DenseLayer) -> SSTLinear:
        seed = self.options["seed"]
        # spaced so the per-iteration seeds of different layers never collide
        sample_seed = (seed + self._built) * 1_000_003 if seed is not None else int(torch.randint(0, 2**52, ()))
        self._built += 1
        module = SSTLinear(layer, self.rank, sample_seed)
        module.sample()
        return module

    def round_length(self, layer: SSTLinear) -> int:
        return self.options["iterations_per_round"] or math.ceil(layer.k / layer.rank)

    def after_step(self, model: nn.Module, *, step: int, total_steps: int, optimizer: Any) -> None:
        resample = step % self.options["resample_every"] == 0 and step < total_steps
        for layer in self.layers(model).values():
            layer.project()
            if not resample:
                continue
            if int(layer.iteration) % self.round_length(layer) == 0:
                layer.decompose(layer.dense_weight())
                reset_optimizer_state(optimizer, [layer.u_active, layer.v_active, layer.sigma])
                layer.sample()
                continue
            order = layer.sample()
            reset_optimizer_state(optimizer, [layer.u_active, layer.v_active])
            transform_moments(optimizer, layer.sigma, lambda moment: moment[order])
