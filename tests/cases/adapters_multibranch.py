"""Common-suite rows of the multi-branch and dimension-reduced adapters (hydra, lamda)."""

from cases import AdapterCase


def hydra(n_in: int, n_out: int, r: int, r_s: int | None = None) -> int:
    """Parallel ``A_p`` (r x in), ``B_p`` (out x r); sequential ``A_s`` (r_s x out), ``B_s`` (out x r_s)."""
    r_s = r if r_s is None else r_s
    return r * (n_in + n_out) + 2 * r_s * n_out


CASES = [
    AdapterCase("hydra", "hydra", {}, False, True, hydra),
    AdapterCase("hydra-sequential-rank", "hydra", {"sequential_rank": 2}, False, True,
                lambda n_in, n_out, r: hydra(n_in, n_out, r, 2)),
]


def lamda(n_in: int, n_out: int, r: int) -> int:
    """``S`` (r x r) and ``B`` (out x r) train at the start (``A`` is frozen; ``B`` freezes later)."""
    return r * n_out + r * r


CASES += [
    AdapterCase("lamda", "lamda", {}, False, True, lamda),
    AdapterCase("lamda-random-init", "lamda", {"init": "random"}, False, True, lamda),
]
