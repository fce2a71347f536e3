"""Known answers of the base-vs-tuned diagnostics on constructed weight pairs."""

import torch

from cases.row_types import UpdateCase

N = 32
SPECTRUM = [10.0 - 9.0 * k / (N - 1) for k in range(N)]  # distinct, evenly spaced: 10 .. 1


def base_and_bases(seed: int = 0):
    """``W0 = U diag(SPECTRUM) V^T`` (32 x 32, float64) with its singular vectors."""
    gen = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(N, N, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(N, N, generator=gen, dtype=torch.float64))
    return u @ torch.diag(torch.tensor(SPECTRUM, dtype=torch.float64)) @ v.T, u, v


def small_noise():
    """dW: Gaussian noise of norm 1e-3 * sigma_min: no singular direction moves much."""
    w0, _, _ = base_and_bases()
    gen = torch.Generator().manual_seed(1)
    noise = torch.randn(N, N, generator=gen, dtype=torch.float64)
    return w0, w0 + 1e-3 * noise / noise.norm()


def rank_one_intruder(scale: float = 50.0):
    """dW = scale * a b^T with a spread evenly over the bottom 16 base left singular vectors (so
    |cos| <= 1/4 with every base direction, and orthogonal to the top 16) and b likewise on the
    right: the tuned matrix's top direction is ~a, an intruder; its next nine are base directions."""
    w0, u, v = base_and_bases()
    a = u[:, 16:].sum(dim=1) / 4.0
    b = v[:, 16:].sum(dim=1) / 4.0
    return w0, w0 + scale * torch.outer(a, b)


def two_intruders():
    """Two such directions of different sizes, each spread over 8 of the bottom base directions."""
    w0, u, v = base_and_bases()
    a1, a2 = u[:, 16:24].sum(dim=1) / 8 ** 0.5, u[:, 24:].sum(dim=1) / 8 ** 0.5
    b1, b2 = v[:, 16:24].sum(dim=1) / 8 ** 0.5, v[:, 24:].sum(dim=1) / 8 ** 0.5
    return w0, w0 + 60.0 * torch.outer(a1, b1) + 40.0 * torch.outer(a2, b2)


def rotated_top():
    """Full-fine-tuning-like: the top two directions rotate into each other by 20 degrees (cos 0.94)."""
    w0, u, v = base_and_bases()
    c, s = torch.cos(torch.tensor(0.35, dtype=torch.float64)), torch.sin(torch.tensor(0.35, dtype=torch.float64))
    u_rot = u.clone()
    u_rot[:, 0], u_rot[:, 1] = c * u[:, 0] + s * u[:, 1], -s * u[:, 0] + c * u[:, 1]
    return w0, u_rot @ torch.diag(torch.tensor(SPECTRUM, dtype=torch.float64)) @ v.T


CASES = [
    UpdateCase("intruder_dimensions/small-noise", "intruder_dimensions", small_noise, 0.0),
    UpdateCase("intruder_dimensions/rank-one-orthogonal", "intruder_dimensions", rank_one_intruder, 1.0),
    UpdateCase("intruder_dimensions/two-directions", "intruder_dimensions", two_intruders, 2.0),
    UpdateCase("intruder_dimensions/rotation-is-not-intrusion", "intruder_dimensions", rotated_top, 0.0),
    # |cos| of the intruder with the base is 1/4: not an intruder for a threshold of 0.2
    UpdateCase("intruder_dimensions/epsilon-0.2", "intruder_dimensions", rank_one_intruder, 0.0,
               options={"epsilon": 0.2}),
    # only the top direction examined: the larger of the two
    UpdateCase("intruder_dimensions/k-1", "intruder_dimensions", two_intruders, 1.0, options={"k": 1}),
]
