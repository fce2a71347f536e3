"""The base optimizer of every low-rank gradient method: projector x inner optimizer x update rule.

One step of a projected parameter ``W`` (``m x n``) with gradient ``G`` (the sealed
:meth:`LowRankAdamW.step_parameter`; the hooks a method may override are marked ``hook``)::

    G non-finite?  -> skip (state untouched, warned once)
    G      = prepare_gradient(G)                                  # hook: e.g. G + stored error
    X, G_X = reparametrise(W, G)                                  # hook: the tensor the step trains (W)
    if refresh is due:  projector.refresh(state, G_X, group)      # new subspace, timed (batched: see step)
                        switch_moments(old basis -> new basis)    # hook: keep / reset / rotate
    basis  = projector.basis(state, X)                            # L (m x r) and/or R (n x r)
    low    = basis.project(G_X)                                   # L^T G R
    direction, step_size = inner.update(state, low, group)        # e.g. Adam: m / (sqrt(v) + eps)
    X     -= step_size * update_rule.combine(LowRankStep(...))    # e.g. GaLore: scale * L direction R^T
                                                                  # (update_rule.apply: GaLore fuses it, addmm_)
    write_back(W, X)                                              # hook: W from X (nothing when X is W)
    W     -= lr * weight_decay * W                                # decoupled decay, after the step
    after_update(W)                                               # hook: e.g. requantise W

Parameters in groups without the key ``rank`` skip the projection, the update rule and the
hooks: they run the inner optimizer on the full gradient (plain AdamW).

``step()`` runs the same arithmetic group by group in phases, so the element-wise parts use
torch's multi-tensor kernels (``InnerOptimizer.update_many`` / ``step_many``: Adam's moments,
the unprojected update; one ``_foreach_add_`` for the weight decay) as
``torch.optim.AdamW(foreach=True)`` does, and the subspaces due at this step are decomposed
in batched calls (``SVDProjector.decompose``); :meth:`LowRankAdamW.step_parameter` is the
one-parameter path (layerwise mode, FSDP2 shards) and gives the same result.

Guarantees the base class gives every method
- Options: ``HYPERPARAMETERS`` (Adam's, :data:`rankwise.optim.options.ADAM`, with the method's
  defaults) are checked at construction and in every group that overrides them; the group
  keys (``OPTIONS``, e.g. :data:`rankwise.optim.options.SUBSPACE`) are filled in and checked
  when a group with ``rank`` is added; :meth:`LowRankAdamW.check_group` adds the constraints
  single-key declarations cannot express (2-D weights, ``rank <= min(m, n)``, ...).
- All state lives in ``optimizer.state[p]`` as tensors or plain Python values, so
  ``state_dict()`` loads with ``torch.load(weights_only=True)``; :meth:`load_state_dict`
  keeps the saved dtypes (torch would cast integer / quantised state to the parameter's dtype).
  Random projectors draw from :meth:`parameter_seed` (a deterministic per-parameter int)
  combined with ``state["step"]``, never from global RNG state.
- A non-finite gradient skips that parameter's step (state untouched); the test is
  ``isfinite(G.sum())`` (:func:`rankwise.optim.numerics.gradient_is_finite`), between refreshes
  on the projection ``L^T G R`` instead (which a non-finite ``G`` makes non-finite). An SVD that
  fails keeps the previous subspace (or skips the step when there is none yet). Each kind of
  trouble is reported once per optimizer with ``warnings.warn``.
- ``refresh_seconds``: cumulative wall time spent in subspace refreshes (CUDA-synchronised).
- The step runs in the parameter's dtype (fp64, fp32, bf16; SVDs in fp32, fp64 for fp64).
- :meth:`step_parameter` steps a single parameter and returns whether it stepped (layerwise
  mode calls it from post-accumulate-grad hooks); FSDP2 shards (DTensors) are dispatched to
  :func:`rankwise.optim.distributed.step_sharded`, so a method's pieces and hooks see plain
  tensors only. It is final: a subclass that defines it fails at import.

How to add an optimizer
-----------------------
1. Create ``optim/<method>.py`` with a module docstring citing the paper (title + arXiv id),
   the formula implemented, and the deviations. Import shared pieces from the family modules
   (:mod:`~rankwise.optim.projectors`, :mod:`~rankwise.optim.inner`, :mod:`~rankwise.optim.rules`,
   :mod:`~rankwise.optim.options`), never from another method module.
2. Implement only the pieces that differ, each a small stateless class whose per-parameter
   state goes into the ``state`` dict it is handed: a :class:`~rankwise.optim.pieces.Projector`,
   an :class:`~rankwise.optim.pieces.InnerOptimizer`, an :class:`~rankwise.optim.pieces.UpdateRule`.
3. Subclass :class:`LowRankAdamW` and set ``projector`` / ``inner`` / ``update_rule`` (or
   override :meth:`projector_for`), ``OPTIONS`` (e.g. ``{**with_defaults(SUBSPACE, scale=1.0),
   "my_key": Option(...)}``), ``HYPERPARAMETERS`` when Adam's defaults differ
   (``with_defaults(ADAM, eps=1e-8)``), and only the hooks the method needs.
4. Register the class: ``@OPTIMIZERS.register("<name>", family=..., paper=..., arxiv=...,
   supports=("layerwise", "ddp", "fsdp2"))`` and import the module in ``optim/__init__.py``.
5. Add one ``OptimizerCase`` row to ``tests/cases/optim_<family>.py``; the common suite
   (``tests/test_optim.py``, and the layerwise and distributed tables) runs every registered
   name and fails for a name without a row.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Iterable, Mapping, Sequence, final

import torch
from torch.optim import Optimizer

from rankwise.errors import RankwiseError
from rankwise.linalg.projections import Basis
from rankwise.linalg.svd import SVDFailure
from rankwise.optim.base import OptimizerMethod
from rankwise.optim.distributed import NONFINITE_MESSAGE, is_dtensor, step_sharded
from rankwise.optim.inner import AdamMoments
from rankwise.optim.numerics import gradient_is_finite
from rankwise.optim.pieces import InnerOptimizer, LowRankStep, Projector, RefreshItem, Reparametrised, UpdateRule
from rankwise.options import resolve

_SEALED = ("step_parameter",)


@dataclass
class _Started:
    """A parameter's step up to the inner optimizer (``low_grad`` is None for an unprojected one)."""

    param: torch.Tensor
    group: Mapping[str, Any]
    weight: torch.Tensor
    grad: torch.Tensor
    state: dict
    trained: Reparametrised | None = None
    basis: Basis | None = None
    low_grad: torch.Tensor | None = None


class LowRankAdamW(OptimizerMethod, Optimizer):
    """Base optimizer: AdamW whose groups with a ``rank`` key are projected (see module docstring).

    ``LowRankAdamW(params, lr, betas, eps, weight_decay, correct_bias)``: an argument left at
    None takes the method's declared default (``HYPERPARAMETERS``); other declared
    hyperparameters are keywords. ``param_names`` (``id(param) -> name``) only improves error
    messages; ``no_deprecation_warning`` is accepted so code written for galore-torch runs
    unchanged (rankwise has no deprecation warning to silence).
    """

    projector: ClassVar[Projector]
    inner: ClassVar[InnerOptimizer] = AdamMoments()
    update_rule: ClassVar[UpdateRule]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for name in _SEALED:
            if name in vars(cls):
                raise TypeError(
                    f"{cls.__name__} defines {name}, which LowRankAdamW seals: override its hooks "
                    "(prepare_gradient, reparametrise, switch_moments, write_back, after_update) instead"
                )

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict],
        lr: float | None = None,
        betas: tuple[float, float] | None = None,
        eps: float | None = None,
        weight_decay: float | None = None,
        correct_bias: bool | None = None,
        no_deprecation_warning: bool = False,
        *,
        param_names: Mapping[int, str] | None = None,
        **hyperparameters: Any,
    ) -> None:
        del no_deprecation_warning
        given = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay, "correct_bias": correct_bias}
        given = {k: v for k, v in {**given, **hyperparameters}.items() if v is not None}
        defaults = resolve(self.HYPERPARAMETERS, given, owner=type(self).__name__)
        self._param_names = dict(param_names or {})
        self._positions: dict[int, int] = {}
        self.refresh_seconds = 0.0
        self.shared_buffers: dict[str, torch.Tensor] = {}  # e.g. one DCT matrix per size; counted once
        self._prepared: dict[int, Basis] = {}  # id(param) -> basis decomposed ahead by the batched refresh
        super().__init__(params, defaults)

    @classmethod
    def construct(cls, groups: list[dict], hyperparameters: dict[str, Any], names: Mapping[int, str]) -> Any:
        return cls(groups, **hyperparameters, param_names=names)

    # ---- groups

    def add_param_group(self, param_group: dict) -> None:
        group = dict(param_group)
        params = group["params"]
        group["params"] = [params] if isinstance(params, torch.Tensor) else list(params)
        owner = type(self).__name__
        for key in set(group) & set(self.HYPERPARAMETERS):
            group[key] = self.HYPERPARAMETERS[key].check(key, group[key], owner)
        if "rank" in group:
            group = self.resolve_aliases(group)
            declared = self.group_options()
            group.update(resolve(declared, {k: v for k, v in group.items() if k in declared}, owner=owner))
            self.check_group(group, group["params"])
        super().add_param_group(group)

    def check_group(self, group: Mapping[str, Any], params: Sequence[torch.Tensor]) -> None:
        """Hook: RankwiseError for a projected group whose keys are valid one by one but not
        together or not for these parameters (extend with ``super()`` first)."""
        rank = group["rank"]
        for param in params:
            if param.ndim != 2:
                raise RankwiseError(
                    f"a projected group (one with 'rank') holds {self.param_name(param)} with {param.ndim} dims; "
                    "only 2-D weights can be projected: move it to a group without 'rank'"
                )
            limit = min(param.shape)
            if rank is not None and rank > limit:
                raise RankwiseError(
                    f"rank {rank} exceeds min(m, n) = {limit} of {self.param_name(param)} "
                    f"({param.shape[0]} x {param.shape[1]}); "
                    f"pass rank <= {limit} or leave this layer out of the targets"
                )

    def param_name(self, param: torch.Tensor) -> str:
        return self._param_names.get(id(param), f"parameter of shape {tuple(param.shape)}")

    # ---- hooks a method may override

    def projector_for(self, group: Mapping[str, Any]) -> Projector:
        """Hook: the projector of a projected group (override to choose by a group key)."""
        return self.projector

    def refresh_due(self, state: Mapping[str, Any], group: Mapping[str, Any]) -> bool:
        """Hook: refresh at step 0, then when ``state["refresh_at"]`` is reached."""
        return state["step"] >= state.get("refresh_at", 0)

    def refresh_gap(self, state: Mapping[str, Any], group: Mapping[str, Any]) -> int:
        """Hook: steps from this refresh to the next; ``update_proj_gap`` (adaptive schedules override)."""
        return group["update_proj_gap"]

    def prepare_gradient(self, grad: torch.Tensor, state: dict, group: Mapping[str, Any]) -> torch.Tensor:
        """Hook: the gradient the step uses (e.g. ``G + E`` for error feedback). Called after the
        non-finite check, when the step will run (a first refresh can still fail, but then no
        earlier step has left state to lose)."""
        return grad

    def reparametrise(
        self, weight: torch.Tensor, grad: torch.Tensor, state: dict, group: Mapping[str, Any]
    ) -> Reparametrised:
        """Hook: the tensor the projected step updates and its gradient (by default ``W`` and ``G``).
        Must not change ``state``: the step may still be skipped."""
        return Reparametrised(weight, grad)

    def switch_moments(self, state: dict, group: Mapping[str, Any], old: Basis, new: Basis) -> None:
        """Hook: the inner optimizer's state at a subspace switch, by ``moment_policy``: ``keep``
        (untouched), ``reset`` (forgotten; the bias correction restarts) or ``rotate``
        (``inner.rotate`` with ``old.transition(new)``)."""
        policy = group["moment_policy"]
        if policy == "reset":
            self.inner.reset(state)
            state["moment_origin"] = state["step"]
        elif policy == "rotate":
            self.inner.rotate(state, *old.transition(new), group)

    def write_back(self, weight: torch.Tensor, trained: Reparametrised, state: dict, group: Mapping[str, Any]) -> None:
        """Hook: set ``weight`` from the updated ``trained`` tensor (nothing to do when it is the weight)."""

    def after_update(self, param: torch.Tensor, weight: torch.Tensor, state: dict, group: Mapping[str, Any]) -> None:
        """Hook: after the update and the weight decay of a projected weight (e.g. requantise it).
        ``param`` keys the state and the seed; ``weight`` holds the values (the gathered full
        matrix under FSDP2)."""

    # ---- stepping

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One step of every parameter with a gradient: :meth:`step_parameter`'s arithmetic, with
        the element-wise parts (Adam's moments, the update of unprojected parameters, the
        weight decay) run by torch's multi-tensor kernels over the group, and the due
        subspaces of a group decomposed in batched calls."""
        loss = self.evaluate_closure(closure)
        for group in self.param_groups:
            params = [param for param in group["params"] if param.grad is not None]
            if "rank" in group:
                self._decompose_due(params, group)
            pending = []
            for param in params:
                if is_dtensor(param):
                    self.step_parameter(param, group)
                elif (started := self._begin(param, group, param, param.grad)) is not None:
                    pending.append(started)
            if not pending:
                continue
            if "rank" not in group:
                self.inner.step_many([p.weight for p in pending], [p.grad for p in pending],
                                     [p.state for p in pending], group)
                self._decay_many([p.weight for p in pending], group)
                continue
            steps = self.inner.update_many([p.state for p in pending], [p.low_grad for p in pending], group)
            for started, (direction, step_size) in zip(pending, steps):
                self._apply(started, direction, step_size)
            self._decay_many([p.weight for p in pending], group)
            for started in pending:
                self.after_update(started.param, started.weight, started.state, group)
        self._prepared.clear()
        return loss

    def _decompose_due(self, params: Sequence[torch.Tensor], group: Mapping[str, Any]) -> None:
        """Batched refresh: the new subspaces of every parameter of ``group`` due for a refresh
        at this step, decomposed together (same-shape gradients in one call) and left in
        ``self._prepared`` for their steps. Only for a batched projector and when the
        gradient the refresh sees can be computed ahead without touching the state (the
        default ``prepare_gradient``; ``reparametrise`` never changes the state). A batch that
        fails is left to the per-parameter refreshes (which keep the previous subspace)."""
        projector = self.projector_for(group)
        if not projector.batched or type(self).prepare_gradient is not LowRankAdamW.prepare_gradient:
            return
        items, owners = [], []
        for param in params:
            if is_dtensor(param) or param.grad.is_sparse or not gradient_is_finite(param.grad):
                continue
            state = self.state[param]
            state.setdefault("step", 0)
            if not self.refresh_due(state, group):
                continue
            trained = self.reparametrise(param, param.grad, state, group)
            items.append(RefreshItem(trained.grad, state, self.parameter_seed(param, group)))
            owners.append(param)
        if len(items) < 2:
            return  # nothing to batch: the step's own refresh is the same call
        start = self._clock(items[0].grad)
        try:
            bases = projector.decompose(items, group)
        except SVDFailure:
            return
        finally:
            self.refresh_seconds += self._clock(items[0].grad) - start
        self._prepared.update({id(param): basis for param, basis in zip(owners, bases)})

    @final
    @torch.no_grad()
    def step_parameter(
        self,
        param: torch.Tensor,
        group: Mapping[str, Any],
        *,
        weight: torch.Tensor | None = None,
        grad: torch.Tensor | None = None,
    ) -> bool:
        """One step of one parameter (see the module docstring); True when it stepped.

        ``param`` keys the state and the seed; the update is computed from ``grad`` and written
        into ``weight`` (both default to ``param`` / ``param.grad``). An FSDP2 shard (a DTensor)
        is dispatched to :func:`rankwise.optim.distributed.step_sharded`, which passes the
        gathered full weight and gradient back here.
        """
        if weight is None and is_dtensor(param):
            return step_sharded(self, param, group)
        started = self._begin(param, group, param if weight is None else weight, param.grad if grad is None else grad)
        if started is None:
            return False
        if started.low_grad is None:
            direction, step_size = self.inner.update(started.state, started.grad, group)
            started.weight.add_(direction, alpha=-step_size)
            self._decay(started.weight, group)
            return True
        direction, step_size = self.inner.update(started.state, started.low_grad, group)
        self._apply(started, direction, step_size)
        self._decay(started.weight, group)
        self.after_update(param, started.weight, started.state, group)
        return True

    def _begin(
        self, param: torch.Tensor, group: Mapping[str, Any], weight: torch.Tensor, grad: torch.Tensor
    ) -> _Started | None:
        """The step up to the inner optimizer: guards, step count, and for a projected parameter
        the prepared gradient, the subspace (refreshed when due) and ``L^T G R``. None = skipped."""
        if grad.is_sparse:
            raise RankwiseError(f"{type(self).__name__} does not support sparse gradients ({self.param_name(param)})")
        state = self.state[param]
        check_projection = self._projection_reveals_nonfinite(state, group)
        if not check_projection and not gradient_is_finite(grad):
            self.warn_once("nonfinite", NONFINITE_MESSAGE)
            return None
        state.setdefault("step", 0)
        if "rank" not in group:
            state["step"] += 1
            return _Started(param, group, weight, grad, state)
        grad = self.prepare_gradient(grad, state, group)
        trained = self.reparametrise(weight, grad, state, group)
        basis = self._current_basis(param, trained.grad, state, group, like=trained.tensor)
        if basis is None:
            return None
        low_grad = basis.project(trained.grad)
        if check_projection and not gradient_is_finite(low_grad):
            self.warn_once("nonfinite", NONFINITE_MESSAGE)
            return None
        state["step"] += 1
        return _Started(param, group, weight, grad, state, trained, basis, low_grad)

    def _projection_reveals_nonfinite(self, state: Mapping[str, Any], group: Mapping[str, Any]) -> bool:
        """Whether the non-finite check may look at ``L^T G R`` instead of ``G``: a NaN or inf
        entry of ``G`` makes its whole row / column of the projection NaN or inf (IEEE: ``inf *
        0 = NaN``), and the projection is ``r / m`` of ``G``'s size, so the check stops reading
        every gradient once more. Only when nothing before the projection touches the state: a
        projected group between refreshes, with the default ``prepare_gradient``."""
        return ("rank" in group and "step" in state and not self.refresh_due(state, group)
                and type(self).prepare_gradient is LowRankAdamW.prepare_gradient)

    def _apply(self, started: _Started, direction: torch.Tensor, step_size: float) -> None:
        """The update rule's full-size update applied to the trained tensor, then written back."""
        trained, group = started.trained, started.group
        step = LowRankStep(trained.tensor, trained.grad, started.low_grad, direction, step_size, started.basis,
                           started.state, group)
        self.update_rule.apply(step, trained.tensor, -step_size)
        self.write_back(started.weight, trained, started.state, group)

    @staticmethod
    def _decay(weight: torch.Tensor, group: Mapping[str, Any]) -> None:
        if group["weight_decay"] > 0.0:
            weight.add_(weight, alpha=-group["lr"] * group["weight_decay"])

    @staticmethod
    def _decay_many(weights: Sequence[torch.Tensor], group: Mapping[str, Any]) -> None:
        """:meth:`_decay` of several weights, one multi-tensor launch per device and dtype."""
        if group["weight_decay"] <= 0.0 or not weights:
            return
        buckets: dict[tuple, list[torch.Tensor]] = {}
        for weight in weights:
            buckets.setdefault((weight.device, weight.dtype), []).append(weight)
        for members in buckets.values():
            torch._foreach_add_(members, members, alpha=-group["lr"] * group["weight_decay"])

    def _current_basis(
        self, param: torch.Tensor, grad: torch.Tensor, state: dict, group: Mapping[str, Any], *, like: torch.Tensor
    ) -> Basis | None:
        """``param`` keys the seed; ``like`` (the trained tensor) gives the basis its shape, device and dtype."""
        projector = self.projector_for(group)
        if not self.refresh_due(state, group):
            return projector.basis(state, like)
        old = projector.basis(state, like) if projector.has_basis(state) else None
        prepared = self._prepared.pop(id(param), None)
        start = self._clock(grad)
        try:
            if prepared is not None:
                projector.store(state, prepared, grad, group)  # type: ignore[attr-defined]
            else:
                projector.refresh(state, grad, group, seed=self.parameter_seed(param, group))
        except SVDFailure as exc:
            self.warn_once("svd", f"subspace refresh failed ({exc}); kept the previous subspace or skipped the step")
            if old is None:
                return None  # nothing to project on yet: skip, retry at the next step
        else:
            if old is not None:
                self.switch_moments(state, group, old, projector.basis(state, like))
        finally:
            self.refresh_seconds += self._clock(grad) - start
        state["refresh_at"] = state["step"] + self.refresh_gap(state, group)
        return projector.basis(state, like)

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
