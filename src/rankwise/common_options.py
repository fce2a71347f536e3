"""Option declarations that methods of several pillars share (one declaration, one message).

A method puts the shared object in its ``OPTIONS`` (``{"niter": NITER, ...}``); see
:mod:`rankwise.options`.
"""

from __future__ import annotations

from rankwise.options import Option

#: The randomized-SVD switch of :func:`rankwise.linalg.svd.truncated_svd` (Halko et al. 2011),
#: used by the SVD-based adapter inits (PiSSA, CorDA, LoRA-GA, LoRA-SB, SORSA, SVFit, EVA's PCA steps)
#: and compressors.
NITER = Option(
    None, int, low=0, nullable=True,
    help="power iterations of a randomized SVD (e.g. 4); None = exact thin SVD",
)
