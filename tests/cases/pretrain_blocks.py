from cases.row_types import PretrainCase


def ffn(name: str) -> bool:
    return ".mlp." in name


CASES = [
    # structured_ffn: FFN layers only; the dense guide (m n) is trainable while self-guided training lasts
    PretrainCase("structured_ffn-lowrank-guided", "structured_ffn", {},
                 lambda n_in, n_out, r: r * (n_in + n_out) + n_in * n_out, replaces=ffn),
    PretrainCase("structured_ffn-lowrank", "structured_ffn", {"guided_fraction": 0.0},
                 lambda n_in, n_out, r: r * (n_in + n_out), replaces=ffn),
    PretrainCase("structured_ffn-block_dense", "structured_ffn", {"structure": "block_dense", "guided_fraction": 0.0,
                                                                  "seed": 0},
                 lambda n_in, n_out, r: r * (n_out + n_in // 4), replaces=ffn),
    PretrainCase("structured_ffn-block_shuffle-guided", "structured_ffn", {"structure": "block_shuffle", "seed": 0},
                 lambda n_in, n_out, r: min(n_in, n_out) * (n_in + n_out) // 2 + n_in * n_out, rank=None,
                 replaces=ffn),
    # Monarch: min(m, n) (m + n) / nblocks weights (2 n^2 / nblocks when square)
    PretrainCase("monarch", "monarch", {"seed": 0}, lambda n_in, n_out, r: min(n_in, n_out) * (n_in + n_out) // 4,
                 rank=None),
    PretrainCase("monarch-projected-2", "monarch", {"nblocks": 2, "init": "project"},
                 lambda n_in, n_out, r: min(n_in, n_out) * (n_in + n_out) // 2, rank=None),
]
