from cases.row_types import CompressCase

# Data-aware factorisations minimise a weighted error, so their plain weight error is above
# the Eckart-Young optimum by an amount that depends on the data: no upper bound here (their
# own objectives are checked in tests/test_compress_objectives.py).
CASES = [
    CompressCase("asvd", "asvd", {}, needs_data=True),
    CompressCase("asvd-alpha-1", "asvd", {"alpha": 1.0}, needs_data=True),
    CompressCase("fwsvd", "fwsvd", {}, needs_data=True),
    CompressCase("svd_llm", "svd_llm", {}, needs_data=True),
    CompressCase("svd_llm-v2-refit", "svd_llm", {"whitening": "eigen", "refit": True}, needs_data=True),
]
