"""The framework of every low-rank gradient optimizer: projector x inner optimizer x residual rule.

One step of a projected parameter ``W`` (``m x n``) with gradient ``G``::

    if refresh is due:  projector.refresh(state, G, group)      # new subspace, timed
                        + moment policy (keep / reset / rotate) # old -> new coordinates
    basis  = projector.basis(state, W)                          # L (m x r) and/or R (n x r)
    low    = basis.project(G)                                   # L^T G R
    direction, step_size = inner.update(state, low, group)      # e.g. Adam: m / (sqrt(v) + eps)
    update = residual.combine(LowRankStep(...))                 # e.g. GaLore: scale * L direction R^T
    W -= step_size * update ;  W -= lr * weight_decay * W       # decoupled decay, after the step

Parameters in groups without the key ``rank`` skip the projection and the residual rule:
they run the inner optimizer on the full gradient (plain AdamW).

Guarantees the base class gives every method
- All state lives in ``optimizer.state[p]`` as tensors or plain Python values (ints,
  floats, strings), so ``state_dict()`` saves with ``torch.save`` and loads with
  ``torch.load(weights_only=True)``; :meth:`LowRankAdamW.load_state_dict` keeps the saved
  dtypes (torch would cast integer / quantised state to the parameter's float dtype).
  Random projectors must draw their matrices from the ``seed`` passed to
  :meth:`Projector.refresh` (a deterministic per-parameter int, see
  :meth:`LowRankAdamW.parameter_seed`) combined with ``state["step"]`` -- store the result
  as ``state["proj_seed"]`` and regenerate in ``basis`` -- never from global RNG state.
- A non-finite gradient skips that parameter's step (state untouched). The test is
  ``isfinite(G.sum())`` (fp16 summed in fp32), one reduction instead of an element-wise
  mask: a NaN or inf anywhere makes the sum non-finite; a finite gradient whose sum
  overflows (``|sum| > 3.4e38``) is skipped too, a step worth skipping anyway. An SVD that fails
  keeps the previous subspace (or skips the step when there is none yet). Each kind of
  trouble is reported once per optimizer with ``warnings.warn``.
- ``refresh_seconds``: cumulative wall time spent in subspace refreshes (CUDA-synchronised).
- :func:`state_bytes` counts every state tensor once, plus ``optimizer.shared_buffers``
  (a ``dict[str, Tensor]`` for buffers shared between parameters, e.g. one DCT matrix per
  size) once.
- :meth:`LowRankAdamW.step_parameter` steps a single parameter (layerwise mode calls it
  from post-accumulate-grad hooks); FSDP2 shards (DTensors) go through
  :func:`rankwise.optim.distributed.step_sharded`. A method's pieces see plain tensors only.

How to add an optimizer
-----------------------
1. Create ``optim/<method>.py`` with a module docstring citing the paper (title + arXiv id),
   the formula implemented, and the deviations.
2. Implement only the pieces that differ from GaLore, each a small stateless class whose
   per-parameter state goes into the ``state`` dict it is handed:

   - a :class:`Projector` (``refresh`` writes the subspace into state under ``proj_*`` keys,
     ``has_basis``, ``basis`` returns a :class:`rankwise.linalg.projections.Basis`);
     e.g. a random projector stores ``state["proj_seed"]`` and regenerates ``L`` in ``basis``;
   - an :class:`InnerOptimizer` (``update`` returns ``(direction, step_size)``; ``reset`` and
     ``rotate`` serve the moment policies); e.g. 8-bit moments store quantised tensors;
   - a :class:`ResidualRule` (``combine`` returns the full-space update from a
     :class:`LowRankStep`, which carries ``grad``, ``low_grad``, ``direction``,
     ``step_size``, ``basis``, ``state`` and ``group``); e.g. Fira adds the scaled residual
     ``G - L L^T G``, APOLLO scales the raw ``grad`` instead of projecting back.
3. Subclass :class:`LowRankAdamW` and set
   - ``projector`` / ``inner`` / ``residual`` (or override
     :meth:`LowRankAdamW.projector_for` to choose the projector by a group key);
   - ``method_defaults``: every group key the method accepts, with the reference
     package's defaults; it must contain ``rank``, ``update_proj_gap``, ``scale``,
     ``proj_type`` and ``moment_policy`` (the paper's choice), plus ``seed`` for random
     projectors;
   - ``__init__`` only if the AdamW defaults (lr, betas, eps, weight_decay,
     correct_bias) differ from GaLore's;
   - :meth:`LowRankAdamW.validate_projected_group` for new keys (call ``super()`` first);
   - :meth:`LowRankAdamW.refresh_gap` (or ``refresh_due``) for adaptive schedules
     (Q-GaLore).
   Buffers shared between parameters go into ``self.shared_buffers``; seeded random
   matrices come from :func:`rankwise.linalg.projections.seeded_gaussian`.
4. Register the builder: ``OPTIMIZERS.register("<name>")(<Class>.from_parameters)`` and add
   ``from rankwise.optim import <method>  # noqa: F401`` to ``optim/__init__.py``.
5. Add one ``OptimizerCase`` row to ``tests/cases/optim_<family>.py`` (run by
   ``tests/test_optim.py``): name, hparams (small rank, ``update_proj_gap=2`` so resume
   crosses a refresh) and ``weight_bytes(m, n)``, the exact
   state bytes of one targeted ``m x n`` fp32 weight (``other_bytes`` if the unprojected
   parameters' state differs from two fp32 moments); the common suite then checks loss decrease, state
   bytes, ``weights_only`` round trip, resume equality and non-finite gradients. Put
   method-specific checks (oracle comparisons) in ``tests/test_optim_<method>.py``.
"""

from __future__ import annotations

import math
import time
import warnings
from abc import ABC, abstractmethod
from dataclasses import dataclass
from numbers import Real
from typing import Any, Callable, ClassVar, Iterable, Mapping, Sequence

import torch
from torch.optim import Optimizer

from rankwise.errors import RankwiseError
from rankwise.linalg.projections import PROJ_TYPES, Basis, change_coordinates, projection_sides, singular_basis
from rankwise.linalg.svd import SVDFailure
from rankwise.optim.distributed import NONFINITE_MESSAGE, is_dtensor, step_sharded
from rankwise.optim.numerics import gradient_is_finite
from rankwise.registry import Registry

OPTIMIZERS: Registry[Callable[..., Optimizer]] = Registry("optimizer")
"""name -> builder ``(projected: list[(name, Parameter)], others: list[Parameter], *, lr, **hparams)``."""

MOMENT_POLICIES = ("keep", "reset", "rotate")
ADAM_HPARAMS = ("betas", "eps", "weight_decay", "correct_bias")


def validate_adam_hparams(lr: Any, betas: Any, eps: Any, weight_decay: Any) -> None:
    """RankwiseError unless ``lr >= 0``, ``0 <= beta < 1``, ``eps >= 0``, ``weight_decay >= 0``."""
    if not _is_real(lr) or lr < 0:
        raise RankwiseError(f"lr must be a number >= 0, got {lr!r}")
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2 and all(_is_real(b) and 0 <= b < 1 for b in betas)):
        raise RankwiseError(f"betas must be two numbers in [0, 1), e.g. (0.9, 0.999); got {betas!r}")
    if not _is_real(eps) or eps < 0:
        raise RankwiseError(f"eps must be a number >= 0, got {eps!r}")
    if not _is_real(weight_decay) or weight_decay < 0:
        raise RankwiseError(f"weight_decay must be a number >= 0, got {weight_decay!r}")


def _is_real(value: Any) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value)


def _is_positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


# --------------------------------------------------------------------------- pieces


class Projector(ABC):
    """Chooses a parameter's subspace and materialises it as a :class:`Basis`.

    Stateless: everything per parameter goes into ``state`` (tensors / plain values, keys
    ``proj_*``). ``refresh`` must leave ``state`` unchanged when it raises ``SVDFailure``.
    """

    @abstractmethod
    def refresh(self, state: dict, grad: torch.Tensor, group: Mapping[str, Any], *, seed: int) -> None:
        """Choose a new subspace for ``grad`` and store it in ``state``."""

    @abstractmethod
    def has_basis(self, state: Mapping[str, Any]) -> bool:
        """Whether ``state`` already holds a subspace."""

    @abstractmethod
    def basis(self, state: Mapping[str, Any], param: torch.Tensor) -> Basis:
        """The stored subspace as a :class:`Basis` (regenerated from a seed where one is stored)."""


class SVDProjector(Projector):
    """GaLore's projector: top-``rank`` singular vectors of the current gradient (fp32 SVD).

    ``L = U[:, :r]`` / ``R = V[:, :r]`` on the side(s) chosen by ``proj_type``, stored in
    the gradient's dtype as ``state["proj_left"]`` / ``state["proj_right"]``. ``seed`` is unused.
    """

    def refresh(self, state: dict, grad: torch.Tensor, group: Mapping[str, Any], *, seed: int) -> None:
        use_left, use_right = projection_sides(grad.shape, group["proj_type"])
        basis = singular_basis(grad, group["rank"], use_left=use_left, use_right=use_right)
        for key, factor in (("proj_left", basis.left), ("proj_right", basis.right)):
            if factor is not None:
                state[key] = factor

    def has_basis(self, state: Mapping[str, Any]) -> bool:
        return "proj_left" in state or "proj_right" in state

    def basis(self, state: Mapping[str, Any], param: torch.Tensor) -> Basis:
        return Basis(state.get("proj_left"), state.get("proj_right"))


class InnerOptimizer(ABC):
    """Runs on the (projected) gradient; keeps its moments in ``state``."""

    @abstractmethod
    def update(self, state: dict, grad: torch.Tensor, group: Mapping[str, Any]) -> tuple[torch.Tensor, float]:
        """Update the moments with ``grad``; return ``(direction, step_size)``."""

    @abstractmethod
    def reset(self, state: dict) -> None:
        """Forget the moments (the ``reset`` moment policy)."""

    @abstractmethod
    def rotate(self, state: dict, c_left: torch.Tensor | None, c_right: torch.Tensor | None) -> None:
        """Carry the moments into new coordinates ``low_new = C_L low_old C_R`` (``rotate`` policy)."""


class AdamMoments(InnerOptimizer):
    """Adam (Kingma & Ba, arXiv 1412.6980) in the bias-correction form of GaLore / HF AdamW::

        m = b1 m + (1 - b1) g ;  v = b2 v + (1 - b2) g^2
        direction = m / (sqrt(v) + eps)
        step_size = lr * sqrt(1 - b2^t) / (1 - b1^t)     (lr when correct_bias is False)

    ``t`` counts steps since the moments started (``state["step"] - state["moment_origin"]``;
    the origin moves only under the ``reset`` policy). Moments have the gradient's dtype.
    """

    moment_keys = ("exp_avg", "exp_avg_sq")

    def update(self, state: dict, grad: torch.Tensor, group: Mapping[str, Any]) -> tuple[torch.Tensor, float]:
        if "exp_avg" not in state:
            state["exp_avg"] = torch.zeros_like(grad)
            state["exp_avg_sq"] = torch.zeros_like(grad)
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        beta1, beta2 = group["betas"]
        exp_avg.mul_(beta1).add_(grad, alpha=1.0 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
        direction = exp_avg / exp_avg_sq.sqrt().add_(group["eps"])
        step_size = group["lr"]
        if group["correct_bias"]:
            t = state["step"] - state.get("moment_origin", 0)
            step_size = step_size * math.sqrt(1.0 - beta2**t) / (1.0 - beta1**t)
        return direction, step_size

    def reset(self, state: dict) -> None:
        for key in self.moment_keys:
            state.pop(key, None)

    def rotate(self, state: dict, c_left: torch.Tensor | None, c_right: torch.Tensor | None) -> None:
        if "exp_avg" not in state:
            return
        state["exp_avg"] = change_coordinates(state["exp_avg"], c_left, c_right)
        state["exp_avg_sq"] = change_coordinates(state["exp_avg_sq"], c_left, c_right, squared=True)


@dataclass
class LowRankStep:
    """Everything a residual rule may need for one parameter's step."""

    param: torch.Tensor
    grad: torch.Tensor  # full gradient G (m x n)
    low_grad: torch.Tensor  # L^T G R
    direction: torch.Tensor  # inner optimizer's output in the subspace
    step_size: float  # the update is applied as W -= step_size * combine(...)
    basis: Basis
    state: dict
    group: Mapping[str, Any]

    def project_back(self, low: torch.Tensor) -> torch.Tensor:
        return self.basis.project_back(low)


class ResidualRule(ABC):
    """Turns the low-rank direction (and the part of ``G`` outside the subspace) into the full update."""

    @abstractmethod
    def combine(self, step: LowRankStep) -> torch.Tensor:
        """The full-size update of one step."""


class DropResidual(ResidualRule):
    """GaLore: the residual ``G - L L^T G R R^T`` is dropped; update = ``scale * L direction R^T``."""

    def combine(self, step: LowRankStep) -> torch.Tensor:
        return step.project_back(step.direction) * step.group["scale"]


# --------------------------------------------------------------------------- optimizer


class LowRankAdamW(Optimizer):
    """Base optimizer: AdamW whose groups with a ``rank`` key are projected (see module docstring).

    Group keys of a projected group: those in ``method_defaults`` (missing ones take these
    defaults). Subclasses set ``projector``, ``inner``, ``residual``, ``method_defaults``.
    ``param_names`` (``id(param) -> name``) only improves error messages.
    """

    projector: ClassVar[Projector]
    inner: ClassVar[InnerOptimizer] = AdamMoments()
    residual: ClassVar[ResidualRule]
    method_defaults: ClassVar[Mapping[str, Any]]

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        correct_bias: bool = True,
        no_deprecation_warning: bool = False,
        *,
        param_names: Mapping[int, str] | None = None,
    ) -> None:
        # ``no_deprecation_warning`` is accepted so code written for galore-torch runs unchanged;
        # rankwise has no deprecation warning to silence.
        del no_deprecation_warning
        validate_adam_hparams(lr, betas, eps, weight_decay)
        self._param_names = dict(param_names or {})
        self._warned: set[str] = set()
        self._positions: dict[int, int] = {}
        self.refresh_seconds = 0.0
        self.shared_buffers: dict[str, torch.Tensor] = {}  # e.g. one DCT matrix per size; counted once
        defaults = {
            "lr": lr,
            "betas": tuple(betas),
            "eps": eps,
            "weight_decay": weight_decay,
            "correct_bias": correct_bias,
        }
        super().__init__(params, defaults)

    # ---- construction and validation

    @classmethod
    def from_parameters(
        cls,
        projected: Sequence[tuple[str, torch.Tensor]],
        others: Sequence[torch.Tensor],
        *,
        lr: float,
        **hparams: Any,
    ) -> "LowRankAdamW":
        """The builder registered in :data:`OPTIMIZERS`: group 0 = ``projected``, group 1 = ``others``.

        AdamW hyperparameters (``betas``, ``eps``, ``weight_decay``, ``correct_bias``) apply
        to both groups, method hyperparameters (``method_defaults``) to group 0.
        """
        accepted = set(ADAM_HPARAMS) | set(cls.method_defaults)
        unknown = sorted(set(hparams) - accepted)
        if unknown:
            raise RankwiseError(
                f"unknown hyperparameter(s) {', '.join(unknown)} for {cls.__name__}; "
                f"accepted: {', '.join(sorted(accepted))}"
            )
        adam = {k: v for k, v in hparams.items() if k in ADAM_HPARAMS}  # absent ones: __init__'s defaults
        method = {**cls.method_defaults, **{k: v for k, v in hparams.items() if k in cls.method_defaults}}
        groups: list[dict] = [{"params": [p for _, p in projected], **method}]
        if others:
            groups.append({"params": list(others)})
        return cls(groups, lr=lr, **adam, param_names={id(p): name for name, p in projected})

    def add_param_group(self, param_group: dict) -> None:
        group = dict(param_group)
        params = group["params"]
        group["params"] = [params] if isinstance(params, torch.Tensor) else list(params)
        if "rank" in group:
            for key, value in self.method_defaults.items():
                group.setdefault(key, value)
            self.validate_projected_group(group, group["params"])
        super().add_param_group(group)

    def param_name(self, param: torch.Tensor) -> str:
        return self._param_names.get(id(param), f"parameter of shape {tuple(param.shape)}")

    def validate_projected_group(self, group: Mapping[str, Any], params: Sequence[torch.Tensor]) -> None:
        """RankwiseError for a bad projected group; called before the group is added."""
        rank, gap = group["rank"], group["update_proj_gap"]
        if not _is_positive_int(rank):
            raise RankwiseError(f"rank must be an integer >= 1, got {rank!r}")
        if not _is_positive_int(gap):
            raise RankwiseError(
                f"update_proj_gap must be an integer >= 1 (steps between subspace refreshes), got {gap!r}"
            )
        if not _is_real(group["scale"]) or group["scale"] <= 0:
            raise RankwiseError(f"scale must be a number > 0, got {group['scale']!r}")
        if group["proj_type"] not in PROJ_TYPES:
            raise RankwiseError(f"unknown proj_type {group['proj_type']!r}; known: {', '.join(PROJ_TYPES)}")
        if group["moment_policy"] not in MOMENT_POLICIES:
            known = ", ".join(MOMENT_POLICIES)
            raise RankwiseError(f"unknown moment_policy {group['moment_policy']!r}; known: {known}")
        for param in params:
            if param.ndim != 2:
                raise RankwiseError(
                    f"a projected group (one with 'rank') holds {self.param_name(param)} with {param.ndim} dims; "
                    "only 2-D weights can be projected: move it to a group without 'rank'"
                )
            limit = min(param.shape)
            if rank > limit:
                raise RankwiseError(
                    f"rank {rank} exceeds min(m, n) = {limit} of {self.param_name(param)} "
                    f"({param.shape[0]} x {param.shape[1]}); "
                    f"pass rank <= {limit} or leave this layer out of the targets"
                )

    # ---- stepping

    def projector_for(self, group: Mapping[str, Any]) -> Projector:
        """The projector of a projected group (override to choose by a group key)."""
        return self.projector

    def refresh_due(self, state: Mapping[str, Any], group: Mapping[str, Any]) -> bool:
        """Refresh at step 0, then after each gap (``state["refresh_at"]``)."""
        return state["step"] >= state.get("refresh_at", 0)

    def refresh_gap(self, state: Mapping[str, Any], group: Mapping[str, Any]) -> int:
        """Steps until the next refresh; ``update_proj_gap`` (override for adaptive schedules)."""
        return group["update_proj_gap"]

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is not None:
                    self.step_parameter(param, group)
        return loss

    @torch.no_grad()
    def step_parameter(
        self,
        param: torch.Tensor,
        group: Mapping[str, Any],
        *,
        weight: torch.Tensor | None = None,
        grad: torch.Tensor | None = None,
    ) -> None:
        """One step of one parameter from ``param.grad`` (layerwise mode calls this directly).

        ``param`` keys the state and the seed; the update is computed from ``grad`` and written
        into ``weight`` (both default to ``param`` / ``param.grad``). An FSDP2 shard (a DTensor)
        is dispatched to :func:`rankwise.optim.distributed.step_sharded`, which passes the
        gathered full weight and gradient here.
        """
        if weight is None and is_dtensor(param):
            step_sharded(self, param, group)
            return
        weight = param if weight is None else weight
        grad = param.grad if grad is None else grad
        if grad.is_sparse:
            raise RankwiseError(
                f"{type(self).__name__} does not support sparse gradients ({self.param_name(param)})"
            )
        if not gradient_is_finite(grad):
            self.warn_once("nonfinite", NONFINITE_MESSAGE)
            return
        state = self.state[param]
        if "step" not in state:
            state["step"] = 0
        projected = "rank" in group
        if projected:
            basis = self._current_basis(param, grad, state, group, weight=weight)
            if basis is None:
                return
            low_grad = basis.project(grad)
        else:
            low_grad = grad
        state["step"] += 1
        direction, step_size = self.inner.update(state, low_grad, group)
        if projected:
            step = LowRankStep(weight, grad, low_grad, direction, step_size, basis, state, group)
            update = self.residual.combine(step)
        else:
            update = direction
        weight.add_(update, alpha=-step_size)
        if group["weight_decay"] > 0.0:
            weight.add_(weight, alpha=-group["lr"] * group["weight_decay"])

    def _current_basis(
        self,
        param: torch.Tensor,
        grad: torch.Tensor,
        state: dict,
        group: Mapping[str, Any],
        *,
        weight: torch.Tensor | None = None,
    ) -> Basis | None:
        """``param`` keys the seed; ``weight`` (default ``param``) gives the basis its shape / device."""
        weight = param if weight is None else weight
        projector = self.projector_for(group)
        if not self.refresh_due(state, group):
            return projector.basis(state, weight)
        old = projector.basis(state, weight) if projector.has_basis(state) else None
        start = self._clock(grad)
        try:
            projector.refresh(state, grad, group, seed=self.parameter_seed(param, group))
        except SVDFailure as exc:
            self.warn_once("svd", f"subspace refresh failed ({exc}); kept the previous subspace or skipped the step")
            if old is None:
                return None  # nothing to project on yet: skip, retry at the next step
        else:
            if old is not None:
                self._switch_moments(state, group, old, projector.basis(state, weight))
        finally:
            self.refresh_seconds += self._clock(grad) - start
        state["refresh_at"] = state["step"] + self.refresh_gap(state, group)
        return projector.basis(state, weight)

    def _switch_moments(self, state: dict, group: Mapping[str, Any], old: Basis, new: Basis) -> None:
        policy = group["moment_policy"]
        if policy == "reset":
            self.inner.reset(state)
            state["moment_origin"] = state["step"]
        elif policy == "rotate":
            self.inner.rotate(state, *old.transition(new))

    def parameter_seed(self, param: torch.Tensor, group: Mapping[str, Any]) -> int:
        """Deterministic per-parameter seed: ``group["seed"]`` (default 0) and the parameter's position."""
        if id(param) not in self._positions:
            flat = [p for g in self.param_groups for p in g["params"]]
            self._positions = {id(p): i for i, p in enumerate(flat)}
        return int(group.get("seed", 0)) * 1_000_003 + self._positions[id(param)]

    @staticmethod
    def _clock(tensor: torch.Tensor) -> float:
        if tensor.is_cuda:
            torch.cuda.synchronize(tensor.device)
        return time.perf_counter()

    def warn_once(self, kind: str, message: str) -> None:
        if kind not in self._warned:
            self._warned.add(kind)
            warnings.warn(f"{type(self).__name__}: {message}", RuntimeWarning, stacklevel=3)

    # ---- checkpoints

    def load_state_dict(self, state_dict: dict) -> None:
        """Like torch's, but state tensors keep their saved dtype (int indices, quantised moments)."""
        saved_state = state_dict["state"]
        saved_ids = [pid for g in state_dict["param_groups"] for pid in g["params"]]
        super().load_state_dict(state_dict)
        params = [p for g in self.param_groups for p in g["params"]]
        for pid, param in zip(saved_ids, params):
            for key, value in saved_state.get(pid, {}).items():
                if isinstance(value, torch.Tensor) and key != "step":
                    self.state[param][key] = value.to(device=param.device, copy=True)


def state_bytes(optimizer: Optimizer) -> int:
    """Exact bytes held by the optimizer's state tensors (each storage once) and ``shared_buffers``;
    for DTensor state (torch optimizers under FSDP2) this rank's shards."""
    tensors = [v for st in optimizer.state.values() for v in st.values() if isinstance(v, torch.Tensor)]
    tensors += list(getattr(optimizer, "shared_buffers", {}).values())
    tensors = [t.to_local() if is_dtensor(t) else t for t in tensors]
    seen: set[tuple[str, int]] = set()
    total = 0
    for tensor in tensors:
        storage = tensor.untyped_storage()
        key = (str(tensor.device), storage.data_ptr())
        if key in seen:
            continue
        seen.add(key)
        total += storage.nbytes()
    return total
