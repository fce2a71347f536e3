"""Artificial entanglement: the entanglement entropy of a matrix read as a matrix product state.

Paper: "Artificial Entanglement in the Fine-Tuning of Large Language Models", arXiv
2601.06788. Its claims (abstract and Fig. 1, the only parts readable): the LoRA updates
``dW_Q``, ``dW_V`` of LLaMA models follow a volume law with a central dip (an "entanglement
valley") that full fine-tuning does not show (internal entanglement), and attention matrices
follow an area law with logarithmic corrections (external entanglement; see
:mod:`rankwise.analyze.attention`). The paper does not state its site split, site order,
normalisation or log base; this module states its own, configurable:

**Sites.** An ``out x in`` matrix is reshaped into a tensor with one leg per factor of each
dimension: ``out = m_1 m_2 ... m_a`` (``row_factors``) and ``in = n_1 ... n_b``
(``col_factors``), by default the prime factors of each dimension in ascending order (128 ->
2, 2, 2, 2, 2, 2, 2; 384 -> 2, 2, 2, 2, 2, 2, 2, 3); the row index is ``i = (i_1, ..., i_a)``
in C order (``i_1`` most significant), as ``W.reshape(m_1, ..., m_a, n_1, ..., n_b)``.
``layout`` orders the legs along the chain:

* ``"rows_then_columns"`` (default): ``m_1 .. m_a, n_1 .. n_b``, ``a + b`` sites. The cut
  after the last row leg is the ``out | in`` cut, where the Schmidt values are the singular
  values of ``W`` itself: a rank-``r`` matrix has ``S <= ln r`` there, so a low-rank update
  shows a dip in the middle of an otherwise volume-law profile.
* ``"interleaved"``: site ``k`` is the pair ``(m_k, n_k)`` (the shorter factor list padded
  with 1s), as in an operator MPS with cores ``(chi, m_k, n_k, chi)``. The cut after site
  ``k`` separates ``W`` into Kronecker terms: ``A (x) B`` has ``S = 0`` at the cut between
  its factors' sites (Van Loan & Pitsianis, "Approximation with Kronecker products", 1993).

An MPS (a sequence of cores, or an object whose ``mps_cores()`` returns one: see
:func:`entanglement_profile`) keeps its own sites: one per core, physical dimension ``d_k``
for 3-leg cores ``(left, d_k, right)`` or ``m_k n_k`` for 4-leg operator cores
``(left, m_k, n_k, right)``; its cores need not be canonical.

**Entropy.** At cut ``l`` (between sites ``l`` and ``l + 1``), with Schmidt values
``lambda_k`` normalised so that ``sum_k lambda_k^2 = 1``::

    S_l = - sum_k lambda_k^2 ln lambda_k^2           (natural log, nats)

bounded by ``ln min(D_left, D_right)`` (the product of the site dimensions on each side; the
profile's ``ceiling``) and by ``ln chi_l`` for an MPS of bond dimension ``chi_l``.

**Laws** (:func:`fit_entanglement_law`), fitted by least squares over the cuts
``l = 1 .. N-1`` of an ``N``-site chain:

* volume law: ``S_l = a * ceiling_l + b`` (``ceiling_l = ln d * min(l, N - l)`` for equal
  site dimensions ``d``; a random state fills it up to Page's correction);
* area law: ``S_l = b`` (bounded, independent of the cut);
* log law (area law with the Calabrese-Cardy correction of a critical chain with open
  ends): ``S_l = (c / 6) ln[(2N / pi) sin(pi l / N)] + b``.

The law reported is the one of least BIC, ``n ln(RSS / n) + p ln n`` (``p`` = 1 or 2
parameters, ``n = N - 1`` cuts), the residuals floored at ``1e-6 * max S`` so exact fits
compare; each fit carries its ``r2`` and ``rmse`` (the quality). A volume or log fit whose
slope (``a`` or ``c``) is not positive is not a growing law and is not chosen.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from rankwise.analyze.spectrum import MatrixLike, as_matrix
from rankwise.analyze.tensor_network import as_site_cores, dense_schmidt_values, mps_schmidt_values
from rankwise.errors import RankwiseError
from rankwise.linalg.shapes import prime_factors

LAYOUTS = ("rows_then_columns", "interleaved")
LAWS = ("volume", "area", "log")


def _factors(given: Sequence[int] | None, dim: int, what: str) -> tuple[int, ...]:
    if given is None:
        return prime_factors(dim) or (1,)
    if isinstance(given, (str, bytes)) or not all(isinstance(f, int) and not isinstance(f, bool) and f >= 1
                                                   for f in given):
        raise RankwiseError(f"{what} must be a sequence of positive integers, got {given!r}")
    factors = tuple(given)
    if math.prod(factors) != dim:
        raise RankwiseError(f"{what} {factors} multiply to {math.prod(factors)}, not the dimension {dim}")
    return factors


@dataclass(frozen=True)
class EntanglementProfile:
    """``entropies[l - 1]`` is ``S_l`` at the cut after site ``l`` (nats), ``l = 1 .. N-1``.

    ``site_dims`` are the sites' physical dimensions in chain order, ``bond_dims`` the numerical
    Schmidt ranks, ``ceiling[l - 1] = ln min(D_left, D_right)``; ``layout`` is
    ``"rows_then_columns"``, ``"interleaved"`` or ``"mps"``; ``row_factors`` / ``col_factors``
    the factorisation used (None for an MPS).
    """

    entropies: tuple[float, ...]
    site_dims: tuple[int, ...]
    bond_dims: tuple[int, ...]
    ceiling: tuple[float, ...]
    layout: str
    row_factors: tuple[int, ...] | None = None
    col_factors: tuple[int, ...] | None = None
    schmidt_values: tuple[tuple[float, ...], ...] = field(default=(), repr=False)

    @property
    def num_sites(self) -> int:
        return len(self.site_dims)

    @property
    def cuts(self) -> tuple[int, ...]:
        return tuple(range(1, self.num_sites))

    @property
    def valley(self) -> float:
        """Relative depth of a dip at the central cut ``l_c = N // 2``:
        ``(min(max_left, max_right) - S_c) / min(max_left, max_right)``, with ``max_left`` /
        ``max_right`` the largest entropy at the cuts before / after it; 0 when there is no dip
        (or fewer than 3 cuts)."""
        centre = self.num_sites // 2 - 1
        if not 1 <= centre <= len(self.entropies) - 2:
            return 0.0
        shoulder = min(max(self.entropies[:centre]), max(self.entropies[centre + 1:]))
        if shoulder <= 0:
            return 0.0
        return max(0.0, (shoulder - self.entropies[centre]) / shoulder)

    def to_dict(self) -> dict[str, Any]:
        return {"entropies": list(self.entropies), "cuts": list(self.cuts), "site_dims": list(self.site_dims),
                "bond_dims": list(self.bond_dims), "ceiling": list(self.ceiling), "layout": self.layout,
                "row_factors": None if self.row_factors is None else list(self.row_factors),
                "col_factors": None if self.col_factors is None else list(self.col_factors),
                "valley": self.valley}


def _entropy(schmidt: torch.Tensor) -> float:
    p = schmidt.double().pow(2)
    p = p / p.sum()
    p = p[p > 0]
    return float(-(p * p.log()).sum()) + 0.0  # + 0.0: a product state's -0.0 reads as 0.0


def _profile(values: list[torch.Tensor], site_dims: Sequence[int], layout: str,
             rows: tuple[int, ...] | None, cols: tuple[int, ...] | None) -> EntanglementProfile:
    if not values or any(float(v[0]) <= 0 for v in values):
        raise RankwiseError("the entanglement profile of an all-zero tensor (or of a single site) is undefined")
    total = math.prod(site_dims)
    ceiling, left = [], 1
    for dim in site_dims[:-1]:
        left *= dim
        ceiling.append(math.log(min(left, total // left)))
    return EntanglementProfile(
        entropies=tuple(_entropy(v) for v in values),
        site_dims=tuple(site_dims),
        bond_dims=tuple(int(v.numel()) for v in values),
        ceiling=tuple(ceiling),
        layout=layout,
        row_factors=rows,
        col_factors=cols,
        schmidt_values=tuple(tuple(float(x) for x in v) for v in values),
    )


def _cores_of(source: Any) -> list[torch.Tensor] | None:
    if hasattr(source, "mps_cores") and callable(source.mps_cores):
        return list(source.mps_cores())
    if isinstance(source, (list, tuple)):
        return list(source)
    return None


def entanglement_profile(
    source: MatrixLike | Sequence[torch.Tensor] | Any,
    *,
    row_factors: Sequence[int] | None = None,
    col_factors: Sequence[int] | None = None,
    layout: str = "rows_then_columns",
) -> EntanglementProfile:
    """The entanglement entropy at every cut of ``source`` read as an MPS (module docstring).

    ``source`` is a matrix (a 2-D tensor, a Linear-like / factorised / adapter layer), sited by
    ``row_factors``, ``col_factors`` and ``layout``; or an MPS: a sequence of cores, all
    ``(left, d_k, right)`` or all ``(left, m_k, n_k, right)`` with boundary bonds 1, or any object
    with a method ``mps_cores()`` returning such a sequence. An MPS keeps its own sites, so the
    three site options must not be given with one.
    """
    cores = _cores_of(source)
    if cores is not None:
        if row_factors is not None or col_factors is not None or layout != "rows_then_columns":
            raise RankwiseError("an MPS keeps its own sites: do not pass row_factors, col_factors or layout with cores")
        site_cores, physical = as_site_cores(cores)
        if len(site_cores) < 2:
            raise RankwiseError("an MPS with one core has no cut; its profile is empty")
        return _profile(mps_schmidt_values(site_cores), [math.prod(p) for p in physical], "mps", None, None)
    if layout not in LAYOUTS:
        raise RankwiseError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    matrix = as_matrix(source)
    out_features, in_features = matrix.shape
    rows = _factors(row_factors, out_features, "row_factors")
    cols = _factors(col_factors, in_features, "col_factors")
    if layout == "rows_then_columns":
        site_dims = list(rows + cols)
        tensor = matrix
    else:
        length = max(len(rows), len(cols))
        rows = rows + (1,) * (length - len(rows))
        cols = cols + (1,) * (length - len(cols))
        order = [leg for k in range(length) for leg in (k, length + k)]
        tensor = matrix.reshape(rows + cols).permute(order)
        site_dims = [m * n for m, n in zip(rows, cols)]
    if len(site_dims) < 2:
        raise RankwiseError(f"a {out_features} x {in_features} matrix with these factors has one site and no cut; "
                            "give more row_factors / col_factors")
    return _profile(dense_schmidt_values(tensor.contiguous(), site_dims), site_dims, layout, rows, cols)


@dataclass(frozen=True)
class LawFit:
    """One law fitted by least squares: its parameters, ``rmse``, ``r2`` and ``bic``."""

    law: str
    parameters: dict[str, float]
    rmse: float
    r2: float
    bic: float
    predicted: tuple[float, ...]


@dataclass(frozen=True)
class EntanglementLawFit:
    """The law of least BIC among the growing ones (module docstring) and all three fits."""

    law: str
    fits: dict[str, LawFit]

    @property
    def best(self) -> LawFit:
        return self.fits[self.law]

    def to_dict(self) -> dict[str, Any]:
        return {"law": self.law, "fits": {name: {"parameters": fit.parameters, "rmse": fit.rmse, "r2": fit.r2,
                                                 "bic": fit.bic, "predicted": list(fit.predicted)}
                                          for name, fit in self.fits.items()}}


def _least_squares(design: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return torch.linalg.lstsq(design, target.unsqueeze(1)).solution.squeeze(1)


def fit_entanglement_law(profile: EntanglementProfile | Sequence[float], *,
                         ceiling: Sequence[float] | None = None) -> EntanglementLawFit:
    """Fit the volume, area and log (Calabrese-Cardy) laws to a profile and name the best (module docstring).

    ``profile`` is an :class:`EntanglementProfile` or plain entropies ``S_1 .. S_{N-1}`` (then the
    volume law's regressor is ``min(l, N - l)``, i.e. equal site dimensions, unless ``ceiling`` is given).
    """
    if isinstance(profile, EntanglementProfile):
        entropies, ceiling = list(profile.entropies), list(profile.ceiling)
    else:
        entropies = [float(s) for s in profile]
        if ceiling is None:
            sites = len(entropies) + 1
            ceiling = [float(min(l, sites - l)) for l in range(1, sites)]
    n = len(entropies)
    if n < 3:
        raise RankwiseError(f"fitting an entanglement law needs at least 3 cuts (4 sites), got {n}")
    if len(ceiling) != n:
        raise RankwiseError(f"ceiling has {len(ceiling)} values for {n} entropies")
    sites = n + 1
    s = torch.tensor(entropies, dtype=torch.float64)
    cuts = torch.arange(1, sites, dtype=torch.float64)
    ones = torch.ones(n, dtype=torch.float64)
    chord = torch.log((2 * sites / math.pi) * torch.sin(math.pi * cuts / sites))
    designs = {
        "volume": (torch.stack([torch.tensor(ceiling, dtype=torch.float64), ones], 1), ("slope", "offset")),
        "area": (ones.unsqueeze(1), ("offset",)),
        "log": (torch.stack([chord / 6.0, ones], 1), ("central_charge", "offset")),
    }
    floor = (1e-6 * max(1e-12, float(s.abs().max()))) ** 2
    total = float(((s - s.mean()) ** 2).sum())
    fits = {}
    for law, (design, names) in designs.items():
        coefficients = _least_squares(design, s)
        predicted = design @ coefficients
        rss = float(((s - predicted) ** 2).sum())
        fits[law] = LawFit(
            law=law,
            parameters={name: float(c) for name, c in zip(names, coefficients)},
            rmse=math.sqrt(rss / n),
            r2=1.0 - rss / total if total > 0 else (1.0 if rss <= floor * n else 0.0),
            bic=n * math.log(max(rss / n, floor)) + design.shape[1] * math.log(n),
            predicted=tuple(float(p) for p in predicted),
        )
    growing = {"volume": "slope", "log": "central_charge"}
    eligible = [law for law in LAWS if law not in growing or fits[law].parameters[growing[law]] > 0]
    return EntanglementLawFit(law=min(eligible, key=lambda law: fits[law].bic), fits=fits)
