"""SaRA: progressive sparse fine-tuning of the small-magnitude weights under a nuclear-norm constraint.

Hu, Zhang, Yi, Huang, Wang & Ma 2024, "SaRA: High-Efficient Diffusion Model Fine-tuning with
Progressive Sparse Low-Rank Adaptation", arXiv 2409.06633.

The entries of a pre-trained weight with the smallest magnitudes contribute little to its
function; SaRA re-purposes exactly those. With ``M`` the set of ``k`` selected entries of the
frozen ``out x in`` weight ``W0`` the update is a sparse matrix supported on ``M``:

    h = (W0 + dW) x,    dW = P_M(v)  (v in R^k trainable, scattered into the entries of M; v = 0 at init)

    M = {(i, j): |W0_ij| < threshold}                 (option ``threshold``, as in the release)
    M = the k = min(r (in + out), in out) entries of smallest |W0_ij|   (``threshold=None``, default)

(the default budget gives a rank-``r`` LoRA's parameter count, so the two compare at equal
size). Training adds the nuclear-norm low-rank constraint as a loss term
(:meth:`SaraLayer.regularization`, weight ``lambda_rank``, 5e-4 in the release's script):

    L_rank = lambda_rank * ||dW||_*    (sum of the singular values of the sparse update)

Progressive parameter adjustment (``after_step`` at step ``progressive_fraction * T``, once):
the selection is made again on the current weight ``W0 + dW`` -- the ``k`` entries of smallest
magnitude now -- and training continues on those: an entry that was trained and has grown
large keeps its learned value frozen (buffers ``frozen_indices`` / ``frozen_values``), an entry
still or newly small is trained (its current value carried over), so the update is unchanged
at the switch; the optimizer's state for ``v`` is reset (it referred to the old entries), as
the release rebuilds its optimizer there. Trainable parameters per layer: ``k``.

Deviations: the release thresholds every parameter of the model and applies the nuclear norm
to the masked *weights* ``W (.) M`` of one randomly drawn large matrix per step; here each
adapted layer has its own term on its *update* ``dW`` (the sparse matrix being learned, which
the constraint is meant to keep low-rank), every step. At the progressive stage the release
re-thresholds (the count changes); here the count ``k`` stays fixed (the ``k`` smallest
entries of the current weight) so the adapter's tensors keep their shapes, and with an
explicit ``threshold`` ``k`` is the number of entries of ``W0`` below it. The release's default
learning rate ``1e-3 exp(-350 threshold)`` is not applied (choose the optimizer's rate).
The update is held as ``k`` values and indices and scattered into a dense ``out x in`` matrix in
the forward (the release writes the values into the weight tensor itself).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from rankwise.adapters.base import ADAPTERS, LINEAR_LIKE, AdapterLayer
from rankwise.adapters.hooks import check_total_steps, refuse_merged
from rankwise.options import Option


def smallest_entries(weight: torch.Tensor, count: int) -> torch.Tensor:
    """Flat indices (sorted) of the ``count`` entries of smallest magnitude."""
    return torch.topk(weight.abs().flatten(), count, largest=False, sorted=False).indices.sort().values


@ADAPTERS.register(
    "sara",
    family="sparse",
    paper="SaRA: High-Efficient Diffusion Model Fine-tuning with Progressive Sparse Low-Rank Adaptation",
    arxiv="2409.06633",
    supports=LINEAR_LIKE + ("embedding", "conv2d"),
)
class SaraLayer(AdapterLayer):
    """``(W0 + P_M(v)) x``: the small-magnitude entries ``M`` of ``W0`` trained, nuclear norm on the update."""

    OPTIONS = {
        "threshold": Option(None, float, low=0, low_open=True, nullable=True,
                            help="train the entries with |w| < threshold; None = the r (in + out) smallest"),
        "lambda_rank": Option(5e-4, float, low=0, help="weight of the nuclear norm of the update (0 = none)"),
        "progressive_fraction": Option(0.5, float, low=0, high=1, high_open=True, low_open=True, nullable=True,
                                       help="share of the run after which the entries are selected again; "
                                            "None = no progressive stage"),
    }

    def __init__(self, base: nn.Module, rank: int, alpha: float, **options: Any) -> None:
        super().__init__(base, rank, alpha, **options)
        threshold = self.options["threshold"]
        size = self.out_features * self.in_features
        if threshold is None:
            self.count = min(self.rank * (self.in_features + self.out_features), size)
        else:
            self.count = int((self.base_weight().abs() < threshold).sum())
            if self.count == 0:
                raise self.error(f"no entry of the weight has |w| < threshold={threshold:g}; raise the threshold, "
                                 "or pass threshold=None to train the r (in + out) smallest entries")
        device = self.factory["device"]
        self.register_buffer("sara_indices", torch.zeros(self.count, dtype=torch.int64, device=device))
        self.register_buffer("frozen_indices", torch.zeros(self.count, dtype=torch.int64, device=device))
        self.register_buffer("frozen_values", torch.zeros(self.count, **self.factory))
        self.register_buffer("stage", torch.zeros((), dtype=torch.int64, device=device))
        self.sara_values = nn.Parameter(torch.empty(self.count, **self.factory))

    @classmethod
    def max_rank(cls, in_features: int, out_features: int) -> int:
        # r only sets the budget r (in + out), capped at every entry of the weight
        return max(1, -(-in_features * out_features // (in_features + out_features)))

    def initialize(self, stats: Any = None) -> None:
        with torch.no_grad():
            self.sara_indices.copy_(smallest_entries(self.base_weight(), self.count))
            self.sara_values.zero_()
            self.frozen_indices.zero_()
            self.frozen_values.zero_()
            self.stage.zero_()

    def delta_weight(self) -> torch.Tensor:
        flat = self.sara_values.new_zeros(self.out_features * self.in_features)
        flat = flat.index_add(0, self.frozen_indices, self.frozen_values)
        return flat.index_add(0, self.sara_indices, self.sara_values).view(self.out_features, self.in_features)

    def regularization(self) -> torch.Tensor | None:
        """``lambda_rank * ||dW||_*`` (fp32); None when ``lambda_rank`` is 0 or the adapter is merged."""
        if self.options["lambda_rank"] == 0 or self.merged:
            return None
        return self.options["lambda_rank"] * torch.linalg.svdvals(self.delta_weight().float()).sum()

    def reselect(self, optimizer: Any = None) -> None:
        """The progressive stage: train the ``k`` smallest entries of ``W0 + dW``, freeze the rest of ``dW``."""
        with torch.no_grad():
            update = self.delta_weight().flatten()
            chosen = smallest_entries(self.base_weight().flatten() + update.float(), self.count)
            kept = torch.isin(self.sara_indices, chosen)
            self.frozen_indices.copy_(self.sara_indices)
            self.frozen_values.copy_(torch.where(kept, torch.zeros_like(self.sara_values), self.sara_values))
            self.sara_indices.copy_(chosen)
            self.sara_values.copy_(update[chosen])  # the frozen entries are outside the new selection
            self.stage.fill_(1)
        if optimizer is not None:
            optimizer.state.pop(self.sara_values, None)

    @classmethod
    def after_step(cls, layers: dict[str, SaraLayer], *, step: int, total_steps: int, optimizer: Any = None) -> None:
        pending = {name: layer for name, layer in layers.items()
                   if layer.options["progressive_fraction"] is not None and int(layer.stage) == 0}
        if not pending:
            return
        check_total_steps(total_steps, 1, "sara", "pass the run's total number of optimizer steps")
        refuse_merged(pending, "sara")
        for layer in pending.values():
            if step >= round(layer.options["progressive_fraction"] * total_steps):
                layer.reselect(optimizer)
