from cases.row_types import CompressCase

# MoDeGPT replaces whole LLaMA blocks by smaller dense ones: the per-layer tests do not apply
# (tests/test_compress.py runs the block-level ones; tests/test_compress_modegpt.py the paper's pieces).
CASES = [
    CompressCase("modegpt", "modegpt", {}, needs_data=True),
    CompressCase("modegpt-mlp-only", "modegpt", {"parts": ("mlp",)}, needs_data=True),
]
