"""Weight refactorisation and momentum reset for the factorised (``W = B A``) methods.

Glentis, Li, Shang, Han, Tsaknakis, Wei, Hong, "Scalable Parameter and Memory Efficient
Pretraining for LLM: Recent Algorithmic Advances and Benchmarking", arXiv 2505.22922,
propose two cheap additions to low-rank pretraining, offered here as options of every
method whose layers hold a pair of factors (lowrank, sltrain, lost):

* **weight refactorisation** (``refactor_every = T``): every ``T`` steps the factors are
  re-balanced through the SVD of their product, ``B A = U diag(S) V^T``,

      B <- U diag(sqrt S),   A <- diag(sqrt S) V^T,

  which leaves ``B A`` (so the model's output) unchanged but gives both factors the same
  singular values (the authors' release does this for SLTrain's factors in
  ``merge_and_reinit``). It is computed from thin QRs of the factors, ``B = Q_B R_B``,
  ``A^T = Q_A R_A``, and the SVD of the ``r x r`` core ``R_B R_A^T`` (``O((m + n) r^2)``, no
  ``m x n`` product);
* **momentum reset** (``momentum_reset_every = T``): every ``T`` steps the optimizer state
  of the layer's trainable parameters is dropped, so Adam restarts from zero moments and a
  fresh bias correction (a projected optimizer also re-chooses its subspace).

Both default to None (off), which is the method as its own paper describes it. When both
are on and coincide the reset follows the refactorisation (the old moments would be in the
old factors' coordinates). Deviation: the paper zeroes "the momentum"; resetting the step
counter with it is our choice (zero moments with an old step count would make Adam's first
steps after the reset ~3x too large).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from rankwise.linalg.lowrank import split_singular_values
from rankwise.linalg.svd import svd
from rankwise.options import Option
from rankwise.pretrain.core import Parametrisation, reset_optimizer_state

REFACTOR_OPTIONS: dict[str, Option] = {
    "refactor_every": Option(None, int, low=1, nullable=True,
                             help="steps between re-balancing the factors by the SVD of B A (arXiv 2505.22922); "
                                  "None = never"),
    "momentum_reset_every": Option(None, int, low=1, nullable=True,
                                   help="steps between dropping the optimizer state of the layer's parameters "
                                        "(arXiv 2505.22922); None = never"),
}


@torch.no_grad()
def rebalance_factors(up: torch.Tensor, down: torch.Tensor) -> None:
    """Replace ``up`` (m x r) and ``down`` (r x n) in place by balanced factors of ``up @ down``."""
    work = torch.float64 if up.dtype == torch.float64 else torch.float32
    q_up, r_up = torch.linalg.qr(up.to(work))
    q_down, r_down = torch.linalg.qr(down.to(work).T)
    u, s, vh = svd(r_up @ r_down.T, dtype=work)
    new_up, new_down = split_singular_values(q_up @ u, s, vh @ q_down.T)
    up.copy_(new_up)
    down.copy_(new_down)


class RefactorHooks(Parametrisation):
    """The refactorisation / momentum-reset hooks of a factorised method.

    A method inherits from this class (and declares ``REFACTOR_OPTIONS`` among its
    ``OPTIONS``) and implements :meth:`factor_pairs`.
    """

    OPTIONS = REFACTOR_OPTIONS

    def factor_pairs(self, model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]]:
        """``(up, down, parameters)`` per layer: the two factors and every trainable tensor of the layer."""
        raise NotImplementedError

    def after_step(self, model: nn.Module, *, step: int, total_steps: int, optimizer: Any) -> None:
        refactor, reset = self.options["refactor_every"], self.options["momentum_reset_every"]
        refactor_now = refactor is not None and step % refactor == 0 and step < total_steps
        reset_now = reset is not None and step % reset == 0 and step < total_steps
        if not (refactor_now or reset_now):
            return
        for up, down, parameters in self.factor_pairs(model):
            if refactor_now:
                rebalance_factors(up, down)
            if reset_now:
                reset_optimizer_state(optimizer, parameters)
