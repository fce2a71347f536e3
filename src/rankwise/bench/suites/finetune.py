"""The ``finetune`` suite.

From the cached base checkpoint on the shifted split (documentation prose).
"""

from __future__ import annotations

from rankwise.bench.setup import SetUp, StepFraction

#: the embedded corpus split it trains on, and whether set-ups start from the cached base
WORKLOAD = ("finetune", True)

# Adapters at rank 8 on every Linear layer of the base; methods with only O(r) trainable
# values per layer (loldu, svfit, lora_sb) take a larger learning rate, as their papers do.
SETUPS: list[SetUp] = [
    SetUp("full fine-tuning", "full", lr=3e-4),
    SetUp("lora", "adapter", "lora", lr=3e-3, rank=8),
    # QLoRA: the same LoRA over an NF4 base (rankwise.quantize), the base held in 4 bits while training
    SetUp("qlora", "quantized_adapter", "lora", lr=3e-3, rank=8, default=False),
    # WeLore (arXiv 2407.11239): the base compressed to 50% of its weights, only the low-rank components trained
    SetUp("welore 50% (LRC only)", "compress_lrc", "welore", lr=3e-4, ratio=0.5, default=False),
    SetUp("lora+ (ratio 16)", "adapter", "lora", lr=1e-3, rank=8, default=False,
          optimizer_options={"loraplus_lr_ratio": 16}),
    SetUp("lora_pro", "adapter", "lora_pro", lr=3e-3, rank=8, default=False),
    SetUp("lora_ggpo", "adapter", "lora_ggpo", lr=3e-3, rank=8, default=False),
    SetUp("pissa", "adapter", "pissa", lr=3e-3, rank=8),
    SetUp("pissa (niter 4)", "adapter", "pissa", lr=3e-3, rank=8, options={"niter": 4}, default=False),
    SetUp("olora", "adapter", "olora", lr=3e-3, rank=8, default=False),
    SetUp("loldu", "adapter", "loldu", lr=3e-2, rank=8, default=False),
    SetUp("svfit", "adapter", "svfit", lr=3e-2, rank=8, default=False),
    SetUp("sorsa", "adapter", "sorsa", lr=3e-3, rank=8, default=False),
    SetUp("corda (ipm)", "adapter", "corda", lr=3e-3, rank=8, options={"mode": "ipm"}, default=False),
    SetUp("corda (kpm)", "adapter", "corda", lr=3e-3, rank=8, options={"mode": "kpm"}, default=False),
    SetUp("eva", "adapter", "eva", lr=3e-3, rank=8, default=False),
    SetUp("lora_ga", "adapter", "lora_ga", lr=3e-3, rank=8, default=False),
    SetUp("lora_sb", "adapter", "lora_sb", lr=3e-2, rank=8, default=False),
    SetUp("dylora", "adapter", "dylora", lr=3e-3, rank=8, options={"frozen": False}, default=False),
    SetUp("adalora (12 -> 8)", "adapter", "adalora", lr=3e-3, rank=12,
          options={"target_r": 8, "tinit": StepFraction(0.1), "tfinal": StepFraction(0.2), "deltaT": 5},
          default=False),
    SetUp("increlora (capacity 12)", "adapter", "increlora", lr=3e-3, rank=12,
          options={"init_r": 2, "target_r": 8, "incre_interval": 10}, default=False),
    SetUp("sora (r_max 8)", "adapter", "sora", lr=3e-3, rank=8, default=False),
    # Adapters II, group adapters2a (block-affine, tensor-network, weight-decomposed, Hadamard / Kronecker,
    # Tucker). Bone's paper trains Bone, LoRA and PiSSA at one learning rate (2e-5 on LLaMA2-7B), so
    # bone / miss take LoRA's; DoRA, LoHa, LoKr and FLoRA follow LoRA's rate as their papers / PEFT do;
    # MPS uses s = alpha / chi like LoRA; Compacter's paper trains at 3e-3.
    SetUp("bone", "adapter", "bone", lr=3e-3, rank=8, default=False),
    SetUp("bone (row)", "adapter", "bone", lr=3e-3, rank=8, options={"structure": "row"}, default=False),
    SetUp("miss", "adapter", "miss", lr=3e-3, rank=8, default=False),
    SetUp("mps", "adapter", "mps", lr=3e-3, rank=8, default=False),
    SetUp("dora", "adapter", "dora", lr=3e-3, rank=8, default=False),
    SetUp("loha", "adapter", "loha", lr=3e-3, rank=8, default=False),
    SetUp("lokr", "adapter", "lokr", lr=3e-3, rank=8, default=False),
    SetUp("flora", "adapter", "flora", lr=3e-3, rank=8, default=False),
    SetUp("compacter", "adapter", "compacter", lr=3e-3, rank=8, default=False),
    # adapters2b, random-basis and shared adapters: few trainable values on frozen random tensors, so the
    # vector-scale methods take the larger learning rates their papers use (VeRA 1e-2; NOLA, Uni-LoRA alike);
    # RandLoRA at PEFT's default scale alpha = 20 r; MoS at LoRA's rate with an 8x smaller budget (r_e = 1)
    SetUp("vera (r 128)", "adapter", "vera", lr=1e-2, rank=128, default=False),
    SetUp("randlora (alpha 20r)", "adapter", "randlora", lr=3e-3, rank=8, options={"alpha": 160}, default=False),
    SetUp("unilora (d 2048)", "adapter", "unilora", lr=1e-2, rank=8, options={"theta_d_length": 2048}, default=False),
    SetUp("nola (k = l = 128)", "adapter", "nola", lr=1e-2, rank=8, options={"num_basis_A": 128, "num_basis_B": 128},
          default=False),
    SetUp("mos (r_e 1)", "adapter", "mos", lr=3e-3, rank=8, options={"equivalent_rank": 1}, default=False),
    # ---- Adapters II, multi-branch / dimension-reduced, sparse and subspace (adapters2c)
    SetUp("hydra", "adapter", "hydra", lr=3e-3, rank=8, default=False),
    SetUp("lamda", "adapter", "lamda", lr=3e-3, rank=8, default=False),
    SetUp("lamda++ (spectral ranks)", "adapter", "lamda", lr=3e-3, rank=8, options={"rank_allocation": "spectral"},
          default=False),
    SetUp("s2ft (8 channels)", "adapter", "s2ft", lr=3e-3, rank=8, default=False),
    # SaRA trains raw weight entries: the release's rate 1e-3 exp(-350 * 2e-3) ~ 5e-4, near full fine-tuning's
    SetUp("sara (lora-8 budget)", "adapter", "sara", lr=5e-4, rank=8, default=False),
    # SAID: rank = the subspace dimension d (one theta_d for the whole model, plus a scalar per layer)
    SetUp("said (d 4096)", "adapter", "said", lr=3e-3, rank=4096, default=False),
]
