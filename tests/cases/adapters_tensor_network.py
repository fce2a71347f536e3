import math

from cases import AdapterCase
from rankwise.adapters.mps import automatic_sites, balanced_factors


def mps_parameters(n_in: int, n_out: int, chi: int, layout: str = "interleaved") -> int:
    """``sum_k chi_{k-1} m_k n_k chi_k`` with each bond capped at its Schmidt-rank limit (the factors:
    the module's documented default split)."""
    count = automatic_sites(n_out, n_in)
    rows, cols = balanced_factors(n_out, count), balanced_factors(n_in, count)
    sites = list(zip(rows, cols)) if layout == "interleaved" else [(m, 1) for m in rows] + [(1, n) for n in cols]
    dims = [m * n for m, n in sites]
    bonds = [1] + [min(chi, math.prod(dims[:k]), math.prod(dims[k:])) for k in range(1, len(dims))] + [1]
    return sum(bonds[k] * dims[k] * bonds[k + 1] for k in range(len(dims)))


CASES = [
    # MPS adaptation (arXiv 2601.06788): operator cores (chi, m_k, n_k, chi), or row legs then column legs
    AdapterCase("mps", "mps", {}, False, True, lambda n_in, n_out, r: mps_parameters(n_in, n_out, r)),
    AdapterCase("mps-rows-then-columns", "mps", {"layout": "rows_then_columns"}, False, True,
                lambda n_in, n_out, r: mps_parameters(n_in, n_out, r, "rows_then_columns")),
]
