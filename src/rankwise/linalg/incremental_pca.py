"""Incremental PCA: the top principal directions of a stream of row blocks.

Ross, Lim, Lin & Yang (2008), "Incremental Learning for Robust Visual Tracking" (the
sequential Karhunen-Loeve update with a mean correction), in the form used by EVA
(arXiv 2410.07170) for the SVD of activation minibatches.

State after ``n`` rows: the running mean ``mu`` (d,), the per-feature population variance
(d,), the top ``k`` components ``V_k`` (k x d, orthonormal rows) and singular values ``S_k``
of the centred data seen so far. A new block ``X`` (``m x d``, mean ``mu_X``) is folded in by
the SVD of the stacked matrix

    [ diag(S_k) V_k                              ]    (what is known about the old rows)
    [ X - 1 mu_X^T                               ]    (the new rows, centred on their mean)
    [ sqrt(n m / (n + m)) (mu - mu_X)^T          ]    (the shift between the two means)

whose Gram matrix equals the centred scatter of all ``n + m`` rows restricted to the kept
subspace; its top ``k`` right singular vectors and singular values are the new state. The
first block is simply centred and decomposed. Then

    explained_variance_ratio_i = S_i^2 / sum_j (n * var_j)

is the share of the total (centred) variance carried by component ``i``. Computed in float32
(float64 when asked) on the rows' device; each component's sign is fixed so that its largest
absolute entry is positive, which makes consecutive estimates comparable by cosine.

``niter`` (optional): the top ``k`` of each step by a randomized SVD with that many power
iterations (:func:`rankwise.linalg.svd.truncated_svd`, oversampling 10) instead of the exact
thin SVD of the stacked matrix; the error bound is Halko et al.'s (see ``randomized_svd``).
"""

from __future__ import annotations

import torch

from rankwise.linalg.svd import truncated_svd


class IncrementalPCA:
    """Top-``n_components`` principal directions of all rows passed to :meth:`update`."""

    def __init__(self, n_components: int, *, dtype: torch.dtype = torch.float32, niter: int | None = None) -> None:
        if n_components < 1:
            raise ValueError(f"n_components must be positive, got {n_components}")
        self.n_components = n_components
        self.dtype = dtype
        self.niter = niter
        self.count = 0
        self.mean: torch.Tensor | None = None
        self.variance: torch.Tensor | None = None  # population variance per feature
        self.components: torch.Tensor | None = None  # k x d
        self.singular_values: torch.Tensor | None = None  # k

    def update(self, rows: torch.Tensor) -> None:
        """Fold a block of rows (``m x d``) into the estimate."""
        block = rows.detach().reshape(-1, rows.shape[-1]).to(self.dtype)
        m = block.shape[0]
        if m == 0:
            return
        block_mean = block.mean(dim=0)
        block_variance = block.var(dim=0, unbiased=False)
        centred = block - block_mean
        if self.count == 0:
            stacked = centred
            new_mean, new_variance = block_mean, block_variance
        else:
            n, total = self.count, self.count + m
            shift = self.mean - block_mean
            stacked = torch.cat(
                [
                    self.singular_values[:, None] * self.components,
                    centred,
                    (n * m / total) ** 0.5 * shift[None, :],
                ]
            )
            new_mean = self.mean + shift * (-m / total)
            # Chan et al.'s pairwise update of the sum of squared deviations.
            new_variance = (n * self.variance + m * block_variance + shift**2 * (n * m / total)) / total
        keep = min(self.n_components, *stacked.shape)
        _, s, vh = truncated_svd(stacked, keep, niter=self.niter, dtype=self.dtype)
        peak = vh.abs().argmax(dim=1)
        signs = torch.sign(vh.gather(1, peak[:, None]))
        signs[signs == 0] = 1
        self.components = vh * signs
        self.singular_values = s
        self.count += m
        self.mean, self.variance = new_mean, new_variance

    def explained_variance_ratio(self) -> torch.Tensor:
        """Share of the total centred variance carried by each kept component (k,)."""
        if self.count == 0:
            raise ValueError("no rows were seen")
        total = self.variance.sum() * self.count
        if total <= 0:
            return torch.zeros_like(self.singular_values)
        return self.singular_values**2 / total
