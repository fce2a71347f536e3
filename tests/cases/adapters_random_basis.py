from cases import AdapterCase


def mos_count(equivalent: int, shards: int):
    """r_e l (ceil(in / l) + ceil(out / l)): the pools and private shards of one layer's budget."""
    return lambda n_in, n_out, r: equivalent * shards * (-(-n_in // shards) + -(-n_out // shards))


def randlora_count(n_in: int, n_out: int, r: int) -> int:
    """N (r + m) with m = min(in, out), N = ceil(m / r)."""
    m = min(n_in, n_out)
    return -(-m // r) * (r + m)


CASES = [
    AdapterCase("vera", "vera", {}, False, True, lambda n_in, n_out, r: n_out + r),
    AdapterCase("vera-seed-7", "vera", {"seed": 7, "d_initial": 0.5}, False, True, lambda n_in, n_out, r: n_out + r),
    AdapterCase("randlora", "randlora", {}, False, True, randlora_count),
    AdapterCase("unilora", "unilora", {}, False, False, lambda n_in, n_out, r: 0, shared_trainable=lambda r: 256),
    AdapterCase("unilora-d-100", "unilora", {"theta_d_length": 100, "seed": 3}, False, False,
                lambda n_in, n_out, r: 0, shared_trainable=lambda r: 100),
    AdapterCase("nola", "nola", {"num_basis_A": 32, "num_basis_B": 24}, False, True, lambda n_in, n_out, r: 32 + 24),
    AdapterCase("mos", "mos", {}, False, True, mos_count(1, 2)),
    AdapterCase("mos-private-3-shards", "mos", {"equivalent_rank": 2, "private_rank": 1, "shards": 3}, False, True,
                mos_count(2, 3)),
    AdapterCase("mos-pure-sharing", "mos", {"equivalent_rank": 2, "private_rank": 0, "subset_selection": False,
                                            "pair_dissociation": False, "shards": 1}, False, True, mos_count(2, 1)),
]
