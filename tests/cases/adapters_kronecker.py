from cases import AdapterCase
from rankwise.adapters.lokr import lokr_shapes


def lokr_parameters(n_in: int, n_out: int, r: int, **options) -> int:
    """``a c`` (or ``r (a + c)``) + ``b d`` (or ``r (b + d)``) for W1 (a x c) and W2 (b x d)."""
    (a, c), (b, d), factored_w1, factored_w2 = lokr_shapes(n_in, n_out, r, **options)
    return (r * (a + c) if factored_w1 else a * c) + (r * (b + d) if factored_w2 else b * d)


CASES = [
    # LoKr (LyCORIS, arXiv 2309.14859): W1 (x) W2 with W2 low rank when r < max(b, d) / 2
    AdapterCase("lokr", "lokr", {}, False, True, lambda n_in, n_out, r: lokr_parameters(n_in, n_out, r)),
    AdapterCase("lokr-decompose-both", "lokr", {"decompose_both": True, "decompose_factor": 16}, False, True,
                lambda n_in, n_out, r: lokr_parameters(n_in, n_out, r, decompose_both=True, decompose_factor=16)),
]

CASES += [
    # Compacter (arXiv 2106.04647): two LPHM layers (rank-one fast weights per layer), slow weights n^3 shared once
    AdapterCase("compacter", "compacter", {}, False, True, lambda n_in, n_out, r: n_out + n_in + 2 * r,
                shared_trainable=lambda r: 4 ** 3),
]
