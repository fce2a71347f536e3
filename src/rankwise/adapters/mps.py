"""MPS adaptation: the weight update as a matrix product state (tensor train) of bond dimension chi.

Paper: "Artificial Entanglement in the Fine-Tuning of Large Language Models", arXiv 2601.06788.
Only its abstract and Fig. 1 are readable: the update is an MPS whose bond dimension plays the
role of LoRA's rank, and it behaves like LoRA in entanglement (``rankwise.analyze.entanglement_profile``
reads this adapter's cores directly). The paper does not give the site split, the site order,
the core shapes or the initialisation, so this module builds on the standard tensor-train
operator format (Oseledets, "Tensor-Train Decomposition", SIAM J. Sci. Comput. 33(5), 2011) and
states its own choices:

**Sites.** ``out = m_1 ... m_N`` (``row_factors``) and ``in = n_1 ... n_N`` (``col_factors``),
by default each dimension's prime factors dealt greedily onto ``N`` balanced factors, largest
first (32, N=3 -> 4, 4, 2; 11008, N=3 -> 43, 16, 16); ``N`` (``sites``) defaults to the number
of prime factors of the smaller-factored dimension, clipped to [2, 4]. Both multi-indices are in
C order (the first factor most significant), as ``W.reshape(m_1..m_N, n_1..n_N)`` addresses them.

**Cores.** ``layout="interleaved"`` (default): ``N`` operator cores ``G_k`` of shape
``(chi_{k-1}, m_k, n_k, chi_k)``, site ``k`` carrying the pair ``(i_k, j_k)``::

    dW[(i_1..i_N), (j_1..j_N)] = s * G_1[:, i_1, j_1, :] G_2[:, i_2, j_2, :] ... G_N[:, i_N, j_N, :]

``layout="rows_then_columns"``: ``2N`` cores, the row legs first (``(chi, m_k, 1, chi)``) then
the column legs (``(chi, 1, n_k, chi)``); the bond between them is the ``out | in`` cut, so the
update has matrix rank <= chi there (a LoRA-like bottleneck), while the interleaved layout can
reach full rank. Bond ``k`` has ``chi_k = min(chi, D_left, D_right)`` (``D_left`` / ``D_right``
the products of the site dimensions ``m n`` on each side: the largest Schmidt rank the bond can
carry), ``chi_0 = chi_N = 1``; ``chi`` is ``rank``. Parameters: ``sum_k chi_{k-1} m_k n_k chi_k``.
With every ``chi_k`` at its limit, the MPS represents any ``out x in`` matrix exactly.
``mps_cores()`` returns the cores with the scaling folded into the last one, so
``rankwise.analyze.tensor_network.operator_matrix(layer.mps_cores()) == layer.delta_weight()``.

**Initialisation.** Cores ``1..N-1`` are random left-orthonormal isometries (each reshaped to
``(chi_{k-1} m_k n_k) x chi_k`` has orthonormal columns: the QR of a Gaussian, a left-canonical
MPS) and the last core is zero: the update is zero at init (the model starts as the base), and
since the left environment is an isometry ``||dW||_F = s ||G_N||_F`` -- the last core starts like
LoRA's zero ``B`` in front of an orthonormal ``A``. Scaling ``s = alpha / chi`` (LoRA's choice,
so LoRA's learning rates carry over; the paper states none).

**Forward.** ``adapter_forward`` contracts the input with the cores site by site, last to first (never
forming the ``out x in`` update) when that costs fewer multiply-adds than forming the update and one
dense product; the count of both is exact for the shapes involved.

Deviations: everything above that the paper does not state (it is the standard TT operator
format). No PEFT form exists; the export is the best rank-k LoRA of the update with its error.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from rankwise.adapters.base import ADAPTERS, LINEAR_LIKE, AdapterLayer
from rankwise.linalg.shapes import prime_factors
from rankwise.options import Option

LAYOUTS = ("interleaved", "rows_then_columns")
MAX_AUTO_SITES = 4


def balanced_factors(n: int, count: int) -> tuple[int, ...]:
    """``n`` as ``count`` factors, as equal as the primes allow: each prime, largest first, goes to
    the currently smallest factor; returned largest first (padded with 1s for too few primes)."""
    factors = [1] * count
    for p in sorted(prime_factors(n), reverse=True):
        smallest = min(range(count), key=lambda k: factors[k])
        factors[smallest] *= p
    return tuple(sorted(factors, reverse=True))


def automatic_sites(out_features: int, in_features: int) -> int:
    """``N``: the number of prime factors of the dimension with fewer, clipped to ``[2, 4]``."""
    fewest = min(len(prime_factors(out_features)), len(prime_factors(in_features)))
    return min(MAX_AUTO_SITES, max(2, fewest))


def bond_dimensions(site_dims: list[int], chi: int) -> list[int]:
    """``chi_0 .. chi_N`` with ``chi_k = min(chi, D_left, D_right)`` and boundary bonds 1."""
    total = math.prod(site_dims)
    bonds, left = [1], 1
    for dim in site_dims[:-1]:
        left *= dim
        bonds.append(min(chi, left, total // left))
    return bonds + [1]


@ADAPTERS.register(
    "mps",
    family="tensor_network",
    paper="Artificial Entanglement in the Fine-Tuning of Large Language Models",
    arxiv="2601.06788",
    supports=LINEAR_LIKE,
)
class MpsLayer(AdapterLayer):
    """``dW = s * (G_1 G_2 ... G_N)`` over operator sites ``(m_k, n_k)``; ``G_N = 0`` at init."""

    OPTIONS = {
        "sites": Option(None, int, low=2, nullable=True,
                        help="factors per dimension N (the interleaved layout has N sites, rows_then_columns 2N); "
                             "None = automatic (module docstring), or the length of the given factors"),
        "row_factors": Option(None, tuple, item=int, low=1, nullable=True,
                              help="m_1..m_N with product out_features (C order); None = balanced prime factors"),
        "col_factors": Option(None, tuple, item=int, low=1, nullable=True,
                              help="n_1..n_N with product in_features (C order); None = balanced prime factors"),
        "layout": Option("interleaved", str, choices=LAYOUTS,
                         help="'interleaved': site k carries (m_k, n_k); 'rows_then_columns': the row legs, then "
                              "the column legs (the out|in bond bounds the matrix rank by chi)"),
    }

    @classmethod
    def max_rank(cls, in_features: int, out_features: int) -> int:
        # each bond is capped at the Schmidt rank it can carry; a larger chi changes nothing
        return in_features * out_features

    def __init__(self, base: nn.Module, rank: int, alpha: float, **options: Any) -> None:
        super().__init__(base, rank, alpha, **options)
        rows, cols = self.site_factors()
        if self.options["layout"] == "interleaved":
            self.physical = list(zip(rows, cols))
        else:
            self.physical = [(m, 1) for m in rows] + [(1, n) for n in cols]
        self.bonds = bond_dimensions([m * n for m, n in self.physical], self.rank)
        self.scaling = self.alpha / self.rank
        self.cores = nn.ParameterList(
            nn.Parameter(torch.empty(self.bonds[k], m, n, self.bonds[k + 1], **self.factory))
            for k, (m, n) in enumerate(self.physical)
        )

    def site_factors(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """``(m_1..m_N, n_1..n_N)`` from the options (checked against this layer's shape)."""
        given = {"row_factors": self.options["row_factors"], "col_factors": self.options["col_factors"]}
        lengths = {len(f) for f in given.values() if f is not None}
        sites = self.options["sites"]
        if sites is not None:
            lengths.add(sites)
        if len(lengths) > 1:
            raise self.error(
                f"sites={sites}, row_factors={given['row_factors']} and col_factors={given['col_factors']} disagree "
                "on the number of factors per dimension; give factor lists of one length N (and sites=N or None)"
            )
        count = lengths.pop() if lengths else automatic_sites(self.out_features, self.in_features)
        if count < 2:
            raise self.error("an MPS needs at least 2 factors per dimension; give longer factor lists (1s are allowed)")
        factors = []
        for name, dim in (("row_factors", self.out_features), ("col_factors", self.in_features)):
            chosen = given[name]
            if chosen is None:
                chosen = balanced_factors(dim, count)
            elif math.prod(chosen) != dim:
                raise self.error(
                    f"{name} {tuple(chosen)} multiply to {math.prod(chosen)}, not {dim} (this layer is "
                    f"{self.out_features} x {self.in_features}); give factors of {dim}, target only layers of this "
                    "shape, or leave the factors to the default"
                )
            factors.append(tuple(chosen))
        return factors[0], factors[1]

    def initialize(self, stats: Any = None) -> None:
        with torch.no_grad():
            for core in self.cores[:-1]:
                left, m, n, right = core.shape
                precision = torch.float64 if core.dtype == torch.float64 else torch.float32
                gaussian = torch.randn(left * m * n, right, device=core.device, dtype=precision)
                isometry, _ = torch.linalg.qr(gaussian)  # orthonormal columns: a left-canonical core
                core.copy_(isometry.reshape(core.shape))
            self.cores[-1].zero_()

    def mps_cores(self) -> list[torch.Tensor]:
        """The operator cores ``(chi_{k-1}, m_k, n_k, chi_k)``, the scaling folded into the last one:
        ``operator_matrix(mps_cores()) == delta_weight()`` (C-order multi-indices, boundary bonds 1)."""
        cores = list(self.cores)
        return cores[:-1] + [self.scaling * cores[-1]]

    def delta_weight(self) -> torch.Tensor:
        # running (rows so far, columns so far, bond) block, extended one site at a time (C order)
        block = torch.ones(1, 1, 1, device=self.cores[0].device, dtype=self.cores[0].dtype)
        for core in self.cores:
            rows, cols, _ = block.shape
            _, m, n, right = core.shape
            block = torch.einsum("abc,cmnd->ambnd", block, core).reshape(rows * m, cols * n, right)
        return self.scaling * block.reshape(self.out_features, self.in_features)

    def contract_input(self, x: torch.Tensor) -> torch.Tensor:
        """``x dW^T`` by sweeping the sites from the last to the first: each core absorbs its column
        leg of ``x`` and emits its row leg; the ``out x in`` update is never formed. (Right to left,
        so the rows_then_columns layout first reduces ``x`` to its ``chi`` bond, as LoRA's ``A`` does.)"""
        core0 = self.cores[0]
        leading = x.shape[:-1]
        # state[t, rest, c, emitted]: column legs still to absorb, bond, row legs emitted (least significant)
        state = x.to(core0.dtype).reshape(-1, self.in_features, 1, 1)
        for core in reversed(self.cores):
            tokens, rest, _, emitted = state.shape
            left, m, n, right = core.shape
            state = state.reshape(tokens, rest // n, n, right, emitted)
            state = torch.einsum("trnce,dmnc->trdme", state, core).reshape(tokens, rest // n, left, m * emitted)
        return self.scaling * state.reshape(*leading, self.out_features)

    def sequential_cost(self, tokens: int) -> int:
        """Multiply-adds of :meth:`contract_input` for ``tokens`` input rows."""
        cost, emitted, rest = 0, 1, self.in_features
        for k in reversed(range(len(self.physical))):
            m, n = self.physical[k]
            cost += tokens * rest * self.bonds[k + 1] * self.bonds[k] * m * emitted
            rest, emitted = rest // n, emitted * m
        return cost

    def dense_cost(self, tokens: int) -> int:
        """Multiply-adds of forming the update (:meth:`delta_weight`) and applying it to ``tokens`` rows."""
        cost, rows, cols = 0, 1, 1
        for k, (m, n) in enumerate(self.physical):
            cost += rows * cols * self.bonds[k] * m * n * self.bonds[k + 1]
            rows, cols = rows * m, cols * n
        return cost + tokens * self.out_features * self.in_features

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.numel() // self.in_features
        if self.sequential_cost(tokens) <= self.dense_cost(tokens):
            return self.contract_input(x)
        return self.project_in(x, self.delta_weight())
