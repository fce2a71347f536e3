"""LoRA-Pro: an AdamW for LoRA adapters whose low-rank update best matches full fine-tuning.

Paper: Wang, Liang, He, Wang & Tan, "LoRA-Pro: Are Low-Rank Adapters Properly Optimized?",
arXiv 2407.18242 (ICLR 2025).

A LoRA layer computes with ``W = W0 + s B A`` (``B`` m x r, ``A`` r x n). With the full
gradient ``g = dL/dW`` its factors receive ``g_A = s B^T g`` and ``g_B = s g A^T``, and a
step ``A -= lr g_A', B -= lr g_B'`` moves ``W`` (to first order) by ``-lr * g~`` with the
*equivalent gradient* ``g~ = s (B g_A' + g_B' A)``. LoRA-Pro chooses ``g_A'``, ``g_B'`` to
minimise ``|| g~ - g ||_F`` (Theorem 2.1; ``A``, ``B`` full rank, ``P_B = B (B^T B)^{-1} B^T``)::

    g_A' = (1/s^2) (B^T B)^{-1} g_A + X A
    g_B' = (1/s^2) (I - P_B) g_B (A A^T)^{-1} - B X

for any ``X`` (r x r); the full gradient is needed only through the LoRA gradients ``g_A``,
``g_B`` (nothing m x n is differentiated). Every ``X`` gives the same equivalent gradient,
``g~ = P_B g + (I - P_B) g A^T (A A^T)^{-1} A``, the projection of ``g`` onto the matrices
reachable by a first-order change of ``B A``. Theorem 2.2 picks the ``X`` that keeps
``(g_A', g_B')`` closest to ``(g_A, g_B)``: the solution of the Sylvester equation

    B^T B X + X A A^T = -(1/s^2) (B^T B)^{-1} g_A A^T

(solved with :func:`rankwise.linalg.sylvester.solve_psd_sylvester`).

AdamW form (the paper's algorithm for Adam): Adam's moments are kept for the equivalent
gradient, in weight space (``m x n`` each, like full fine-tuning's AdamW state)::

    g~ = s (B g_A' + g_B' A)                        # from this step's LoRA gradients
    m = b1 m + (1 - b1) g~ ;  v = b2 v + (1 - b2) g~^2
    D = m_hat / (sqrt(v_hat) + eps)                 # Adam's full-space step direction
    g_A^D = s B^T D ;  g_B^D = s D A^T              # what LoRA would receive if D were the gradient
    A -= lr * g_A'(g_A^D, g_B^D) ;  B -= lr * g_B'(g_A^D, g_B^D)   # Theorems 2.1 + 2.2 again

so the factor step realises the best low-rank approximation of the AdamW step of full
fine-tuning. Parameters that are not LoRA pairs (other trainable tensors) get plain AdamW.

Deviations and choices
- ``(B^T B)^{-1}`` and ``(A A^T)^{-1}`` are damped, ``(B^T B + damping I)^{-1}``, as in the
  authors' code (``damping = 1e-8``): at init ``B = 0`` and ``B^T B`` is singular. The
  Sylvester equation uses the undamped Gram matrices and its minimum-norm solution when
  they share a null direction.
- Adam's bias correction is rankwise's :class:`~rankwise.optim.inner.AdamMoments` form
  (``lr sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps)``, eps not bias-corrected).
- Decoupled weight decay (default 0, the authors' default): the authors also decay the frozen
  ``W0``; rankwise keeps the base weight frozen (adapters merge / export against it) and
  decays only the adapter update: ``A, B *= sqrt(1 - lr wd)``, so ``s B A`` shrinks by
  ``1 - lr wd`` per step.
- Math in float32 (float64 for float64 factors) whatever the factors' dtype; the two moments
  are stored in the factors' dtype.

State per LoRA layer (under its ``lora_A``): ``step`` (int), ``exp_avg`` and ``exp_avg_sq``
(``m x n`` each), so ``state_bytes = 2 m n * itemsize`` per layer -- the memory price the
paper reports. Layerwise mode is refused (``A`` and ``B`` must be stepped together).

Use: ``rankwise.adapt(model, "lora_pro")`` (or ``"lora"``, or any adapter whose layers return
their factors from ``AdapterLayer.lora_parameters()``, with both factors trainable) then
``rankwise.optim.build(model, "lora_pro", lr=...)``. The method lives here; the adapter name
``lora_pro`` (:mod:`rankwise.adapters.lora_pro`) is a plain LoRA layer whose class attribute
``training_optimizer = "lora_pro"`` tells the bench / CLI to build this optimizer for it, so
that ``"lora_pro"`` is both an adapter method and an optimizer name. Its builder
(:meth:`LoRAProAdamW.from_model`) takes the adapted model: its groups are LoRA pairs, not the
targeted-weights / rest split of the projected optimizers.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn
from torch.optim import Optimizer

from rankwise.errors import RankwiseError
from rankwise.linalg.sylvester import solve_psd_sylvester
from rankwise.optim.base import OPTIMIZERS, OptimizerMethod
from rankwise.optim.distributed import NONFINITE_MESSAGE
from rankwise.optim.inner import AdamMoments
from rankwise.optim.numerics import gradient_is_finite
from rankwise.optim.options import ADAM, with_defaults, without
from rankwise.options import Option, resolve
from rankwise.targets import Targets


def lora_pro_gradients(
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    grad_a: torch.Tensor,
    grad_b: torch.Tensor,
    scaling: float,
    *,
    damping: float = 1e-8,
) -> tuple[torch.Tensor, torch.Tensor]:
    """LoRA-Pro's adjusted gradients ``(g_A', g_B')`` from the LoRA gradients (see module docstring),
    in float32 (float64 for float64 factors).

    ``s (B g_A' + g_B' A)`` is the best Frobenius approximation of the full gradient that a
    first-order change of ``B A`` can realise, and ``X`` solves Theorem 2.2's Sylvester equation.
    """
    work = _work_dtype(lora_a)
    a, b = lora_a.detach().to(work), lora_b.detach().to(work)
    g_a, g_b = grad_a.to(work), grad_b.to(work)
    eye = torch.eye(a.shape[0], dtype=a.dtype, device=a.device)
    btb, aat = b.T @ b, a @ a.T
    inv_btb = torch.linalg.inv(btb + damping * eye)
    inv_aat = torch.linalg.inv(aat + damping * eye)
    base_a = inv_btb @ g_a / scaling**2
    right = g_b @ inv_aat
    base_b = (right - b @ (inv_btb @ (b.T @ right))) / scaling**2
    x = solve_psd_sylvester(btb, aat, -(base_a @ a.T))
    return base_a + x @ a, base_b - b @ x


def equivalent_gradient(
    lora_a: torch.Tensor, lora_b: torch.Tensor, grad_a: torch.Tensor, grad_b: torch.Tensor, scaling: float
) -> torch.Tensor:
    """``s (B g_A + g_B A)`` (``m x n``, float32 or float64): how a factor step ``-lr (g_A, g_B)`` moves ``W``."""
    work = _work_dtype(lora_a)
    return scaling * (lora_b.detach().to(work) @ grad_a.to(work) + grad_b.to(work) @ lora_a.detach().to(work))


def _work_dtype(tensor: torch.Tensor) -> torch.dtype:
    return torch.promote_types(tensor.dtype, torch.float32)


def lora_pairs(model: nn.Module) -> dict[str, Any]:
    """``{module name: LoraParameters}`` of the adapter layers LoRA-Pro can train: those whose
    ``lora_parameters()`` returns their factors (``W = W0 + scaling * B A``) with both trainable."""
    from rankwise.adapters.base import AdapterLayer  # the optimizers do not need adapters to import

    pairs = {}
    for name, module in model.named_modules():
        if isinstance(module, AdapterLayer):
            factors = module.lora_parameters()
            if factors is not None and factors.A.requires_grad and factors.B.requires_grad:
                pairs[name] = factors
    return pairs


@OPTIMIZERS.register(
    "lora_pro",
    family="adapter_optimizer",
    paper="LoRA-Pro: Are Low-Rank Adapters Properly Optimized?",
    arxiv="2407.18242",
    supports=("ddp",),
)
class LoRAProAdamW(OptimizerMethod, Optimizer):
    """AdamW with LoRA-Pro's gradient adjustment (see module docstring).

    Groups with the key ``scaling`` hold one LoRA pair ``[lora_A, lora_B]`` of a layer with
    ``W = W0 + scaling * B A``; other groups are plain AdamW.
    ``LoRAProAdamW(params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, damping=1e-8)``.
    """

    HYPERPARAMETERS = {
        **with_defaults(without(ADAM, "correct_bias"), eps=1e-8),
        "damping": Option(1e-8, float, low=0, low_open=True,
                          help="added to B^T B and A A^T before inverting them (B = 0 at init)"),
    }
    supports_layerwise = False  # the adjustment needs A's and B's gradients together
    adam = AdamMoments()

    def __init__(self, params: Iterable[dict], **hyperparameters: Any) -> None:
        defaults = resolve(self.HYPERPARAMETERS, hyperparameters, owner=type(self).__name__)
        super().__init__(params, {**defaults, "correct_bias": True})

    @classmethod
    def from_model(cls, model: nn.Module, *, lr: float, targets: Targets = "all-linear", **hparams: Any) -> "LoRAProAdamW":
        """One group per LoRA pair of the adapted ``model`` (``scaling`` from the layer), one plain
        group for the other trainable parameters. RankwiseError when the model has no LoRA pair."""
        if targets != "all-linear":
            raise RankwiseError(
                "lora_pro trains the LoRA adapters chosen when the model was adapted; drop targets "
                "(choose layers with rankwise.adapt(..., targets=...))"
            )
        hyperparameters = resolve(cls.HYPERPARAMETERS, {"lr": lr, **hparams}, owner=cls.__name__)
        pairs = lora_pairs(model)
        if not pairs:
            raise RankwiseError(
                "lora_pro trains LoRA adapters (layers whose lora_parameters() gives trainable A and B) and the "
                "model has none; call rankwise.adapt(model, 'lora_pro') (or 'lora') first"
            )
        groups: list[dict] = [
            {"params": [factors.A, factors.B], "scaling": float(factors.scaling)} for factors in pairs.values()
        ]
        seen = {id(p) for group in groups for p in group["params"]}
        others = []
        for p in model.parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                others.append(p)
        if others:
            groups.append({"params": others})
        return cls(groups, **hyperparameters)

    @classmethod
    def from_parameters(
        cls, projected: Sequence[tuple[str, torch.Tensor]], others: Sequence[torch.Tensor], *, lr: float,
        **hparams: Any,
    ) -> "LoRAProAdamW":
        raise RankwiseError("lora_pro builds its groups from the adapted model: call rankwise.optim.build(model, "
                            "'lora_pro', lr=...)")

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = self.evaluate_closure(closure)
        for group in self.param_groups:
            if "scaling" in group:
                self._step_pair(group)
            else:
                for param in group["params"]:
                    if param.grad is not None:
                        self._step_plain(param, group)
        return loss

    def _finite(self, *grads: torch.Tensor) -> bool:
        if all(gradient_is_finite(g) for g in grads):
            return True
        self.warn_once("nonfinite", NONFINITE_MESSAGE)
        return False

    def _step_plain(self, param: torch.Tensor, group: dict) -> None:
        if not self._finite(param.grad):
            return
        state = self.state[param]
        state["step"] = state.get("step", 0) + 1
        direction, step_size = self.adam.update(state, param.grad, group)
        if group["weight_decay"] > 0:
            param.mul_(1.0 - group["lr"] * group["weight_decay"])
        param.add_(direction, alpha=-step_size)

    def _step_pair(self, group: dict) -> None:
        lora_a, lora_b = group["params"]
        if lora_a.grad is None and lora_b.grad is None:
            return
        grad_a = lora_a.grad if lora_a.grad is not None else torch.zeros_like(lora_a)
        grad_b = lora_b.grad if lora_b.grad is not None else torch.zeros_like(lora_b)
        if not self._finite(grad_a, grad_b):
            return
        scaling, damping = group["scaling"], group["damping"]
        adjusted = lora_pro_gradients(lora_a, lora_b, grad_a, grad_b, scaling, damping=damping)
        full = equivalent_gradient(lora_a, lora_b, *adjusted, scaling).to(lora_a.dtype)
        state = self.state[lora_a]
        state["step"] = state.get("step", 0) + 1
        direction, step_size = self.adam.update(state, full, group)
        work = _work_dtype(lora_a)
        a, b = lora_a.to(work), lora_b.to(work)
        direction = direction.to(work)
        step_a, step_b = lora_pro_gradients(
            a, b, scaling * (b.T @ direction), scaling * (direction @ a.T), scaling, damping=damping
        )
        if group["weight_decay"] > 0:
            shrink = math.sqrt(1.0 - group["lr"] * group["weight_decay"])
            lora_a.mul_(shrink)
            lora_b.mul_(shrink)
        lora_a.add_(step_a.to(lora_a.dtype), alpha=-step_size)
        lora_b.add_(step_b.to(lora_b.dtype), alpha=-step_size)
