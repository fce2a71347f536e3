"""Mutation check: does the test suite catch known-bad changes to the code?

    python tools/mutation_check.py            # every mutation
    python tools/mutation_check.py --list     # their names
    python tools/mutation_check.py --only NAME [--only NAME ...]

Each entry of ``MUTATIONS`` names a file, an exact piece of its text, the bad replacement and
the tests that should catch it (pytest arguments: node ids, files, ``-k`` expressions; a
targeted subset, so the whole check takes minutes). For every mutation the script copies the
tracked tree (``git ls-files``, as it is in the working tree) to a scratch directory, makes
the one replacement there and runs the tests with ``PYTHONPATH`` pointing at the copy's
``src`` (it checks that the copy's ``rankwise`` is the one imported). The mutation is
*caught* when pytest reports failing tests (exit status 1); passing tests, a usage error
(a test id that does not exist), no tests collected or a timeout are *not caught*. First,
the tests of all selected mutations run once on an unmutated copy and must pass, or
"caught" would mean nothing.

The exit status is 1 when any mutation is not caught, when a mutation's original text is
not in its file exactly once (a refactor moved the code: update the entry, never let it
pass silently) or when the unmutated baseline fails; 0 otherwise.

Adding a mutation is one ``Mutation(...)`` entry in ``MUTATIONS``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT_SECONDS = 900


@dataclass(frozen=True)
class Mutation:
    """A known-bad change: in ``file`` (relative to the repository), ``original`` (which must
    occur exactly once) becomes ``replacement``; ``tests`` (pytest arguments) must then fail."""

    name: str
    file: str
    original: str
    replacement: str
    tests: tuple[str, ...]


MUTATIONS: list[Mutation] = [
    # ---- adapters (issue 16's table and the review's finds)
    Mutation("LoRA unmerged forward drops the scaling", "src/rankwise/adapters/lora_family.py",
             "        return (x.to(self.lora_A.dtype) @ self.lora_A.T) @ self.lora_B.T * self.scaling\n",
             "        return (x.to(self.lora_A.dtype) @ self.lora_A.T) @ self.lora_B.T\n",
             ("tests/test_adapters.py", "-k", "merge_unmerge")),
    Mutation("export_peft writes lora_alpha = r", "src/rankwise/adapters/peft_export.py",
             '        entry["peft_alpha"] = _plain_number(entry["scaling"] * denominator)\n',
             '        entry["peft_alpha"] = _plain_number(entry["rank"])\n',
             ("tests/test_adapters_peft_io.py", "tests/test_adapters_peft.py")),
    Mutation("svfit merge is a no-op", "src/rankwise/adapters/svfit.py",
             "    def update_factors(self, dtype: torch.dtype | None = None) -> Factors:\n",
             "    def merge(self) -> None:\n        self.merged = True\n\n"
             "    def update_factors(self, dtype: torch.dtype | None = None) -> Factors:\n",
             ("tests/test_adapters.py", "-k", "svfit")),
    Mutation("SVD inits take the bottom singular vectors", "src/rankwise/adapters/rewrite.py",
             '        return truncated_svd(layer.base_weight(), layer.rank, niter=layer.options["niter"])\n',
             "        u, s, vh = truncated_svd(layer.base_weight(), min(layer.base.weight.shape))\n"
             "        return u[:, -layer.rank :], s[-layer.rank :], vh[-layer.rank :]\n",
             ("tests/test_adapters_datafree.py",)),
    # fast decomposition inits (issue 15)
    Mutation("batched decompositions hand each layer another's share", "src/rankwise/adapters/rewrite.py",
             "            layer.prefetched = tuple(result[index].clone() for result in results)  # own memory\n",
             "            layer.prefetched = tuple(result[-1 - index].clone() for result in results)\n",
             ("tests/test_adapters_fast_init.py", "-k", "batched")),
    Mutation("leading QR drops the sign fix", "src/rankwise/linalg/decompositions.py",
             "    q, triangle = q * signs, triangle * signs[:, None]\n", "",
             ("tests/test_adapters_fast_init.py", "-k", "leading")),
    Mutation("corda ipm forgets the 1 / S of its projection", "src/rankwise/adapters/corda.py",
             "        return u, s, inverse[..., :, None] * (u.mT @ weight)\n", "        return u, s, u.mT @ weight\n",
             ("tests/test_adapters_fast_init.py", "-k", "corda")),
    Mutation("eva shares updates of layers whose inputs differ", "src/rankwise/adapters/eva.py",
             "        twin = next((group for group in candidates if torch.equal(blocks[group[0]], block)), None)\n",
             "        twin = candidates[0] if candidates else None\n",
             ("tests/test_adapters_fast_init.py", "-k", "eva")),
    Mutation("lora_sb skips its base rewrite", "src/rankwise/adapters/lora_sb.py",
             '        return not self.options["start_from_update"]\n', "        return False\n",
             ("tests/test_adapters_datadriven.py", "-k", "lora_sb")),
    # adapters II, group adapters2a (issue 11)
    Mutation("bone drops the affine term + D", "src/rankwise/adapters/block_affine_family.py",
             "    return join_blocks(split_blocks(weight, bones.shape[-1]) @ shared + shared)\n",
             "    return join_blocks(split_blocks(weight, bones.shape[-1]) @ shared)\n",
             ("tests/test_adapters_block_affine.py", "-k", "bone")),
    Mutation("miss averages the input chunks instead of summing", "src/rankwise/adapters/miss.py",
             ".reshape(*x.shape[:-1], -1, self.rank).sum(dim=-2)",
             ".reshape(*x.shape[:-1], -1, self.rank).mean(dim=-2)",
             ("tests/test_adapters_block_affine.py", "-k", "miss")),
    Mutation("mps forward emits the row legs in reversed order", "src/rankwise/adapters/mps.py",
             'torch.einsum("trnce,dmnc->trdme", state, core)', 'torch.einsum("trnce,dmnc->trdem", state, core)',
             ("tests/test_adapters_tensor_network.py",)),
    Mutation("dora lets the gradient through the weight norm", "src/rankwise/adapters/dora.py",
             "        gain = self.lora_magnitude / torch.linalg.vector_norm(directed, dim=1).detach()\n",
             "        gain = self.lora_magnitude / torch.linalg.vector_norm(directed, dim=1)\n",
             ("tests/test_adapters_weight_decomposed.py",)),
    Mutation("loha pairs the Khatri-Rao factors crosswise", "src/rankwise/adapters/loha.py",
             "down = (self.hada_w1_b[:, None, :] * self.hada_w2_b[None, :, :])",
             "down = (self.hada_w2_b[:, None, :] * self.hada_w1_b[None, :, :])",
             ("tests/test_adapters_hadamard.py",)),
    Mutation("kron_apply forgets to transpose the right factor", "src/rankwise/adapters/kronecker_family.py",
             "    return (left @ rows @ right.T).reshape(", "    return (left @ rows @ right).reshape(",
             ("tests/test_adapters_kronecker.py", "-k", "lokr or kron")),
    Mutation("flora core starts random", "src/rankwise/adapters/flora.py",
             "            self.flora_core.zero_()\n", "            self.flora_core.normal_()\n",
             ("tests/test_adapters.py", "-k", "flora")),
    Mutation("compacter slow weights copied per layer", "src/rankwise/adapters/compacter.py",
             '        self.phm_rule = self.shared["phm_rule"]\n',
             '        self.phm_rule = nn.Parameter(self.shared["phm_rule"].detach().clone())\n',
             ("tests/test_adapters_kronecker.py", "-k", "compacter")),
    Mutation("vera unmerged forward drops lambda_d", "src/rankwise/adapters/vera.py",
             "        hidden = self.project_in(x, down) * self.lambda_d\n",
             "        hidden = self.project_in(x, down)\n",
             ("tests/test_adapters_random_basis.py", "-k", "vera")),
    Mutation("randlora pairs each Gamma_i with the wrong basis", "src/rankwise/adapters/randlora.py",
             "        scaled = self.lambdas[:, :, None] * shared_a * self.gammas[None]\n",
             "        scaled = self.lambdas[:, :, None] * shared_a * self.gammas.flip(0)[None]\n",
             ("tests/test_adapters_random_basis.py", "-k", "randlora")),
    Mutation("unilora projection loses its 1 / sqrt(n) column scales", "src/rankwise/adapters/unilora.py",
             "        scale = torch.bincount(assignment, minlength=length).float().clamp(min=1).rsqrt()\n",
             "        scale = torch.ones(length)\n",
             ("tests/test_adapters_random_basis.py", "-k", "unilora")),
    Mutation("nola loses its frozen A_0", "src/rankwise/adapters/nola.py",
             '        down = self.A_0 + torch.einsum("k,kri->ri", self.coefficients_A, self.bases_A)\n',
             '        down = torch.einsum("k,kri->ri", self.coefficients_A, self.bases_A)\n',
             ("tests/test_adapters_random_basis.py", "-k", "nola")),
    Mutation("mos ties A and B shards despite pair_dissociation", "src/rankwise/adapters/mos.py",
             '                    index_b = spread_choice(slots, pool, generator) if options["pair_dissociation"] else index_a\n',
             "                    index_b = index_a\n",
             ("tests/test_adapters_random_basis.py", "-k", "mos")),
    Mutation("hydra's unmerge inverts (I + s B_s A_s) with the wrong Woodbury sign", "src/rankwise/adapters/hydra.py",
             "            weight = rest - up @ solved\n", "            weight = rest + up @ solved\n",
             ("tests/test_adapters_multibranch.py", "-k", "hydra")),
    Mutation("lamda's frozen B columns read from the trained parameter (momentum moves them)",
             "src/rankwise/adapters/lamda.py",
             "        return torch.cat([self.B_frozen[:, :k], self.lamda_B[:, k:]], dim=1)\n",
             "        return self.lamda_B\n",
             ("tests/test_adapters_multibranch.py", "-k", "lamda")),
    Mutation("s2ft selects channel groups that are not aligned to the group size", "src/rankwise/adapters/s2ft.py",
             "indices = (chosen[:, None] * group + torch.arange(group)).flatten()",
             "indices = (chosen[:, None] + torch.arange(group)).flatten()",
             ("tests/test_adapters_sparse.py", "-k", "s2ft")),
    Mutation("sara's progressive stage selects on W0 again instead of the current weight",
             "src/rankwise/adapters/sara.py",
             "chosen = smallest_entries(self.base_weight().flatten() + update.float(), self.count)",
             "chosen = smallest_entries(self.base_weight().flatten(), self.count)",
             ("tests/test_adapters_sparse.py", "-k", "sara")),
    Mutation("fastfood blocks lose their 1/sqrt(d') normalisation", "src/rankwise/linalg/subspace.py",
             "norm = gaussian.norm(dim=1, keepdim=True) * math.sqrt(self.width)",
             "norm = gaussian.norm(dim=1, keepdim=True)",
             ("tests/test_adapters_subspace.py",)),
    Mutation("intrinsic_dimension reports the largest d reaching the threshold, not the smallest",
             "src/rankwise/analyze/intrinsic_dimension.py",
             'if found is None and base_loss - losses[d] >= options["threshold"] * reachable:',
             'if base_loss - losses[d] >= options["threshold"] * reachable:',
             ("tests/test_analyze_intrinsic.py", "-k", "regression")),
    # ---- optimizers (issue 16's table and the review's finds)
    Mutation("projected weights never updated", "src/rankwise/optim/lowrank.py",
             "trained.tensor.add_(self.update_rule.combine(step), alpha=-step_size)",
             "self.update_rule.combine(step)",
             ("tests/test_optim.py", "-k", "rest_frozen")),
    Mutation("Fira residual sign flipped", "src/rankwise/optim/fira.py",
             'step.group["alpha"] + residual', 'step.group["alpha"] - residual',
             ("tests/test_optim_fira.py",)),
    Mutation("exp_avg_sq rotated with C instead of C*C", "src/rankwise/optim/inner.py",
             'state["exp_avg_sq"] = change_coordinates(state["exp_avg_sq"], c_left, c_right, squared=True)',
             'state["exp_avg_sq"] = change_coordinates(state["exp_avg_sq"], c_left, c_right)',
             ("tests/test_optim_moments.py",)),
    Mutation("adamw default weight decay 0.01 -> 0", "src/rankwise/optim/adamw.py",
             "eps=1e-8, weight_decay=1e-2)", "eps=1e-8, weight_decay=0.0)",
             ("tests/test_optim.py", "-k", "adamw_defaults")),
    Mutation("no bias correction", "src/rankwise/optim/inner.py",
             '        if group["correct_bias"]:\n            first, second = bias_corrections(state, group)',
             '        if False:\n            first, second = bias_corrections(state, group)',
             ("tests/test_optim.py", "-k", "loss_decreases")),
    Mutation("DCT scores zeroed", "src/rankwise/optim/dct.py",
             "return coefficients.abs().sum(dim=0)", "return coefficients.abs().sum(dim=0) * 0",
             ("tests/test_optim_dct.py",)),
    Mutation("weight decay lost under DDP", "src/rankwise/optim/lowrank.py",
             'if group["weight_decay"] > 0.0:',
             'if group["weight_decay"] > 0.0 and not torch.distributed.is_initialized():',
             ("tests/test_optim_distributed.py", "-k", "ddp and galore")),
    Mutation("FSDP2 write-back lost", "src/rankwise/optim/distributed.py",
             "local.copy_(distribute_tensor(", "(distribute_tensor(",
             ("tests/test_optim_distributed.py", "-k", "fsdp2 and galore")),
    Mutation("layerwise hooks drop weight decay", "src/rankwise/optim/layerwise.py",
             "self.optimizer.step_parameter(param, group)",
             'self.optimizer.step_parameter(param, {**group, "weight_decay": 0.0})',
             ("tests/test_optim_layerwise.py", "-k", "galore")),
    Mutation("reentrant checkpoint segments counted as backward passes", "src/rankwise/optim/layerwise.py",
             "node = enclosing_backward_node()", "node = None",
             ("tests/test_optim_layerwise.py", "-k", "checkpointing")),
    Mutation("per-coordinate bias correction is a no-op", "src/rankwise/optim/inner.py",
             "return weight2.sqrt().div(weight1).mul_(first / math.sqrt(second))", "return torch.ones_like(weight1)",
             ("tests/test_optim_moments.py",)),
    Mutation("Q-GaLore refresh schedule relative to the last refresh", "src/rankwise/optim/qgalore.py",
             "return (step // gap + 1) * gap - step", "return gap",
             ("tests/test_optim_quant.py",)),
    Mutation("DCT eps on the uncorrected sqrt(v)", "src/rankwise/optim/dct.py",
             'super().update(state, grad, {**group, "eps": eps})', "super().update(state, grad, group)",
             ("tests/test_optim_dct.py",)),
    Mutation("norm-growth limiter in float32 (fp64 crash)", "src/rankwise/optim/rules.py",
             "dtype=torch.promote_types(update.dtype, torch.float32))", "dtype=torch.float32)",
             ("tests/test_optim.py", "-k", "dtype and apollo")),
    Mutation("LoRA+ finds no B factors", "src/rankwise/optim/loraplus.py",
             "if factors is not None and factors.B.requires_grad:",
             "if factors is not None and factors.B.requires_grad and False:",
             ("tests/test_adapters_training.py",)),
    Mutation("LoRA-Pro ignores the layer's scaling", "src/rankwise/optim/lora_pro.py",
             '"scaling": float(factors.scaling)}', '"scaling": 1.0}',
             ("tests/test_adapters_training.py",)),
    Mutation("8-bit moments not requantised after a rotation", "src/rankwise/optim/inner.py",
             "        self.float_adam.rotate(moments, c_left, c_right, group)\n        self._store(state, moments)\n",
             "        self.float_adam.rotate(moments, c_left, c_right, group)\n",
             ("tests/test_optim_moments.py", "tests/test_optim_quant.py")),
    Mutation("LDAdam error feedback lost", "src/rankwise/optim/ldadam.py",
             "return add_error(grad, state, group)", "state.pop('error', None)\n        return grad",
             ("tests/test_optim_ldadam.py",)),
    # ---- compression
    Mutation("svd compression keeps the bottom singular vectors", "src/rankwise/linalg/svd.py",
             "u, s, vh = svd(matrix, dtype=dtype)\n        return u[:, :rank], s[:rank], vh[:rank]",
             "u, s, vh = svd(matrix, dtype=dtype)\n        return u[:, -rank:], s[-rank:], vh[-rank:]",
             ("tests/test_compress.py", "-k", "weight_error or discarded")),
    Mutation("compress bookkeeping counts one factor only", "src/rankwise/compress/plan.py",
             "return rank * (spec.out_features + spec.in_features)",
             "return rank * max(spec.out_features, spec.in_features)",
             ("tests/test_compress.py", "-k", "bookkept")),
    Mutation("rank for a ratio rounds up (over budget)", "src/rankwise/compress/allocation.py",
             "return max(1, math.floor(ratio * spec.break_even))", "return max(1, math.ceil(ratio * spec.break_even))",
             ("tests/test_compress.py", "-k", "bookkept or discarded or one_rank_step")),
    Mutation("svd ignores its niter option", "src/rankwise/compress/svd.py",
             'niter = self.options["niter"]', "niter = None",
             ("tests/test_compress.py", "-k", "randomized")),
    Mutation("the speed break-even rule is ignored", "src/rankwise/compress/plan.py",
             "faster = keep_dense_above is None or rank < keep_dense_above * spec.break_even", "faster = True",
             ("tests/test_compress.py", "-k", "break_even")),
    Mutation("SVD-LLM without whitening", "src/rankwise/compress/svd_llm.py",
             "up, down, _ = weighted_truncation(dense_weight(layer), rank, columns=self.whitening(stats))",
             "up, down, _ = weighted_truncation(dense_weight(layer), rank, columns=None)",
             ("tests/test_compress_objectives.py", "-k", "svd_llm_minimises")),
    Mutation("SVD-LLM's refit leaves up as truncated", "src/rankwise/compress/svd_llm.py",
             "layer.up.weight.copy_(up.to(layer.up.weight.dtype))", "layer.up.weight.copy_(layer.up.weight)",
             ("tests/test_compress_objectives.py", "-k", "refit")),
    Mutation("Cholesky whitening without jitter on a singular Gram matrix", "src/rankwise/compress/whitening.py",
             "jitter = max(-lowest, 0.0) + eps * scale", "jitter = 0.0",
             ("tests/test_compress_objectives.py", "-k", "singular")),
    Mutation("eigen whitening forgets the eigenvalues", "src/rankwise/compress/whitening.py",
             "root = vectors * values.sqrt()", "root = vectors",
             ("tests/test_compress_objectives.py", "-k", "svd_llm_minimises or singular")),
    Mutation("WeLore without min-max normalisation", "src/rankwise/compress/allocation.py",
             "return (singular_values - singular_values.min()) / spread", "return singular_values / singular_values.max()",
             ("tests/test_compress_objectives.py", "-k", "welore")),
    Mutation("WeLore's threshold taken from the release's table instead of searched", "src/rankwise/compress/allocation.py",
             "tau = thresholds[high]", "tau = 0.135",
             ("tests/test_compress_objectives.py", "-k", "welore")),
    Mutation("ASVD without the activation scaling", "src/rankwise/compress/asvd.py",
             'activation_scales(stats.extra["input_abs_mean"], self.options["alpha"])',
             'activation_scales(stats.extra["input_abs_mean"], 0.0)',
             ("tests/test_compress_objectives.py", "-k", "asvd")),
    Mutation("FWSVD without the Fisher row weights", "src/rankwise/compress/fwsvd.py",
             'rows=row_weights(stats.extra["weight_fisher"])', "rows=None",
             ("tests/test_compress_objectives.py", "-k", "fwsvd")),
    Mutation("the sensitivity allocation measures nothing", "src/rankwise/compress/allocation.py",
             "increase = _objective(context, reference) - base", "increase = 0.0",
             ("tests/test_compress_objectives.py", "-k", "sensitivity")),
    Mutation("EoRA without the eigenspace projection", "src/rankwise/compress/eora.py",
             "columns=Whitening.eigen(gram)", "columns=None",
             ("tests/test_compress_compensate.py", "-k", "eora_reduces")),
    Mutation("MoDeGPT's MLP without the Nystrom reconstruction", "src/rankwise/compress/modegpt.py",
             "down = mlp.down_proj.weight.detach().to(torch.float64) @ gram[:, kept] @ torch.linalg.pinv(sub, hermitian=True)",
             "down = mlp.down_proj.weight.detach().to(torch.float64)[:, kept]",
             ("tests/test_compress_modegpt.py", "-k", "nystrom")),
    Mutation("MoDeGPT splits RoPE pairs", "src/rankwise/compress/modegpt.py",
             "return torch.cat([chosen, chosen + half], dim=1)", "return torch.cat([chosen, chosen + 1], dim=1)",
             ("tests/test_compress_modegpt.py", "-k", "query_key")),
    Mutation("load_compressed loses the tied weights", "src/rankwise/compress/io.py",
             "state.update({name: state[stored] for name in names})", "state.update({})",
             ("tests/test_compress.py", "-k", "gpt2")),
    Mutation("densify writes a Conv1D weight untransposed", "src/rankwise/densify.py",
             "layer.weight.copy_(weight.T)", "layer.weight.copy_(weight.reshape(weight.shape[1], weight.shape[0]))",
             ("tests/test_compress.py", "-k", "gpt2")),
    Mutation("trainable_lrc trains everything", "src/rankwise/compress/lrc.py",
             "model.requires_grad_(False)", "model.requires_grad_(True)",
             ("tests/test_compress_compensate.py", "-k", "trainable_lrc")),
    # ---- pretraining parametrisations
    Mutation("lowrank init variance forgets the rank", "src/rankwise/pretrain/lowrank.py",
             "std_down = math.sqrt(sigma * math.sqrt(m / (n * r)))", "std_down = math.sqrt(sigma * math.sqrt(m / n))",
             ("tests/test_pretrain.py", "-k", "variance")),
    Mutation("lowrank factors frozen", "src/rankwise/pretrain/lowrank.py",
             "module = FactorizedLinear.from_factors(up.to(weight.dtype), down.to(weight.dtype), bias)",
             "module = FactorizedLinear.from_factors(up.to(weight.dtype), down.to(weight.dtype), bias)"
             ".requires_grad_(False)",
             ("tests/test_pretrain.py", "-k", "formula or learn")),
    Mutation("relora merge forgets the LoRA scaling", "src/rankwise/pretrain/relora.py",
             "self.weight.add_(self.scaling * (self.lora_B.weight @ self.lora_A.weight))",
             "self.weight.add_(self.lora_B.weight @ self.lora_A.weight)",
             ("tests/test_pretrain_methods.py", "-k", "relora_restart_keeps")),
    Mutation("relora pruning keeps the smallest moments", "src/rankwise/pretrain/relora.py",
             "return tensor * (tensor.abs().float() > threshold).to(tensor.dtype)",
             "return tensor * (tensor.abs().float() <= threshold).to(tensor.dtype)",
             ("tests/test_pretrain_methods.py", "-k", "prune")),
    Mutation("jagged schedule never re-warms after a restart", "src/rankwise/pretrain/schedules.py",
             "if last is not None and restart_warmup_steps and step - last < restart_warmup_steps:",
             "if False:",
             ("tests/test_pretrain_methods.py", "-k", "jagged")),
    Mutation("sltrain saves the dense weight for backward (plain autograd)", "src/rankwise/pretrain/sltrain.py",
             "out = SparsePlusLowRank.apply(x, self.up.weight, self.down.weight, self.values, self.support, self.scaling)",
             "out = x @ self.dense_weight().T",
             ("tests/test_pretrain_methods.py", "-k", "no_dense_matrix")),
    Mutation("sltrain sparse gradient read at the wrong entries", "src/rankwise/pretrain/sltrain.py",
             "grad_values = grad_weight.view(-1)[support].to(values.dtype)",
             "grad_values = grad_weight.view(-1)[support.flip(0)].to(values.dtype)",
             ("tests/test_pretrain_methods.py", "-k", "sltrain_gradients")),
    Mutation("lost keeps the weakest residual channels", "src/rankwise/pretrain/lost.py",
             "channels = residual.norm(dim=0).topk(count).indices.sort().values",
             "channels = residual.norm(dim=0).topk(count, largest=False).indices.sort().values",
             ("tests/test_pretrain_methods.py", "-k", "lost")),
    Mutation("structured_ffn leaves the dropped guide in the optimizer", "src/rankwise/pretrain/structured_ffn.py",
             'group["params"] = [p for p in group["params"] if p is not weight]',
             'group["params"] = list(group["params"])',
             ("tests/test_pretrain_methods.py", "-k", "self_guided")),
    Mutation("monarch projection keeps one term per block", "src/rankwise/pretrain/blocks.py",
             "count = min(len(terms), sv.numel())", "count = 1",
             ("tests/test_pretrain_methods.py", "-k", "project_monarch")),
    Mutation("sst trains U with the natural gradient", "src/rankwise/pretrain/sst.py",
             "grad_u = flat_grad.T @ flat_h if ctx.needs_input_grad[1] else None",
             "grad_u = flat_grad.T @ (flat_h * sigma) if ctx.needs_input_grad[1] else None",
             ("tests/test_pretrain_methods.py", "-k", "enhanced")),
    Mutation("sst samples by magnitude alone", "src/rankwise/pretrain/sst.py",
             "return 0.5 * (1.0 / sigma.numel() + magnitude)", "return magnitude",
             ("tests/test_pretrain_methods.py", "-k", "sampling_law")),
    Mutation("refactorisation gives all of S to one factor", "src/rankwise/pretrain/refactor.py",
             "new_up, new_down = split_singular_values(q_up @ u, s, vh @ q_down.T)",
             "new_up, new_down = (q_up @ u) * s, vh @ q_down.T",
             ("tests/test_pretrain_methods.py", "-k", "rebalance or refactor")),
    # ---- diagnostics
    Mutation("effective rank drops RankMe's 1e-7", "src/rankwise/analyze/rankme.py",
             "p = singular_values / singular_values.sum() + RANKME_EPS", "p = singular_values / singular_values.sum()",
             ("tests/test_analyze.py", "-k", "known_answer")),
    Mutation("stable rank divides by sigma_1, not its square", "src/rankwise/analyze/numerical_rank.py",
             "/ singular_values.max() ** 2", "/ singular_values.max()",
             ("tests/test_analyze.py", "-k", "known_answer")),
    Mutation("model_report's spectral norm is the smallest singular value", "src/rankwise/analyze/norms.py",
             "return float(singular_values.double().max())", "return float(singular_values.double().min())",
             ("tests/test_analyze.py", "-k", "model_report")),
    Mutation("energy rank off by one", "src/rankwise/analyze/energy_rank.py",
             "return int(reached.nonzero()[0]) + 1", "return int(reached.nonzero()[0])",
             ("tests/test_analyze.py", "-k", "known_answer and energy_rank")),
    Mutation("nuclear norm sums sigma^2", "src/rankwise/analyze/norms.py",
             "return float(singular_values.double().sum())", "return float(singular_values.double().pow(2).sum())",
             ("tests/test_analyze.py", "-k", "known_answer and nuclear_norm")),
    Mutation("power-law MLE with the small-sample n - 1", "src/rankwise/analyze/heavy_tail.py",
             "alphas = 1.0 + tail / spread", "alphas = 1.0 + (tail - 1) / spread",
             ("tests/test_analyze.py", "-k", "known_answer and power_law_alpha")),
    Mutation("power-law KS distance at the upper step of the empirical CDF", "src/rankwise/analyze/heavy_tail.py",
             "empirical = offset / tail[rows].unsqueeze(1)", "empirical = (offset + 1) / tail[rows].unsqueeze(1)",
             ("tests/test_analyze.py", "-k", "weightwatcher")),
    Mutation("intruders are the directions that ARE aligned", "src/rankwise/analyze/intruders.py",
             "indices = torch.nonzero(similarities < epsilon).flatten()",
             "indices = torch.nonzero(similarities > epsilon).flatten()",
             ("tests/test_analyze.py", "-k", "update_known_answer")),
    Mutation("intruder similarity averaged over base directions", "src/rankwise/analyze/intruders.py",
             "similarities = (u1[:, :k].T @ u0).abs().max(dim=1).values",
             "similarities = (u1[:, :k].T @ u0).abs().mean(dim=1)",
             ("tests/test_analyze_updates.py", "-k", "peft")),
    Mutation("mitigation subtracts lambda times the intruders", "src/rankwise/analyze/intruders.py",
             "return w1 + (lam - 1.0) * intruding, len(indices)", "return w1 - lam * intruding, len(indices)",
             ("tests/test_analyze_updates.py", "-k", "mitigat")),
    Mutation("entanglement entropy of s instead of s^2", "src/rankwise/analyze/entanglement.py",
             "p = schmidt.double().pow(2)", "p = schmidt.double()",
             ("tests/test_analyze_entanglement.py", "-k", "natural_log or page")),
    Mutation("MPS cores not canonicalised before the bond SVDs", "src/rankwise/analyze/tensor_network.py",
             "for k in range(len(work) - 1, 0, -1):  # right-canonical from the right end",
             "for k in range(0):  # right-canonical from the right end",
             ("tests/test_analyze_entanglement.py", "-k", "non_canonical")),
    Mutation("interleaved layout keeps rows then columns", "src/rankwise/analyze/entanglement.py",
             "order = [leg for k in range(length) for leg in (k, length + k)]", "order = list(range(2 * length))",
             ("tests/test_analyze_entanglement.py", "-k", "kronecker")),
    Mutation("entanglement law of largest BIC", "src/rankwise/analyze/entanglement.py",
             "law=min(eligible, key=lambda law: fits[law].bic)", "law=max(eligible, key=lambda law: fits[law].bic)",
             ("tests/test_analyze_entanglement.py", "-k", "laws or page")),
    Mutation("attention read without switching to eager", "src/rankwise/analyze/text_inputs.py",
             'switch = eager_attention and previous not in (None, "eager")', "switch = False",
             ("tests/test_analyze_entanglement.py", "-k", "attention")),
    Mutation("gradient ranks skip step 1", "src/rankwise/analyze/gradient_rank.py",
             "return step == 1 or step % self.every == 0", "return step % self.every == 0",
             ("tests/test_analyze_training.py", "-k", "rankwise_loop")),
    Mutation("Matrix Nuclear-Norm without centring", "src/rankwise/analyze/representations.py",
             "centred = hidden.detach().double() - hidden.detach().double().mean(dim=0, keepdim=True)",
             "centred = hidden.detach().double()",
             ("tests/test_analyze_training.py", "-k", "proxy_known_answer")),
    Mutation("subspace overlap averages cosines, not their squares", "src/rankwise/analyze/updates.py",
             "float(cosines.pow(2).mean())", "float(cosines.mean())",
             ("tests/test_analyze_updates.py", "-k", "principal_angles")),
    Mutation("adapter layers reported without their update", "src/rankwise/analyze/spectrum.py",
             "return weight if matrix.merged else weight.float() + matrix.delta_weight().float()", "return weight",
             ("tests/test_analyze.py", "-k", "adapter_layers")),
    # ---- the training loop
    Mutation("training loop drops the hooks' loss terms", "src/rankwise/training.py",
             "total = loss if regularizer is None else loss + regularizer", "total = loss",
             ("tests/test_training.py", "-k", "hooks")),
    Mutation("training loop's after_step runs with the previous step number", "src/rankwise/training.py",
             "hook.after_step(model, step=step, total_steps=steps, optimizer=optimizer)",
             "hook.after_step(model, step=step - 1, total_steps=steps, optimizer=optimizer)",
             ("tests/test_training.py", "-k", "hooks")),
    Mutation("accumulation window summed instead of averaged", "src/rankwise/training.py",
             '(total / getattr(optimizer, "accumulation_steps", 1)).backward()', "total.backward()",
             ("tests/test_training.py", "-k", "micro_batches")),
    Mutation("evaluation weighs every batch the same", "src/rankwise/training.py",
             "total += float(loss) * tokens\n                count += tokens",
             "total += float(loss)\n                count += 1",
             ("tests/test_training.py", "-k", "evaluate_weights")),
    Mutation("cosine schedule decays to zero instead of the floor", "src/rankwise/training.py",
             "return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))",
             "return (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))",
             ("tests/test_training.py", "-k", "cosine")),
    # ---- the bench
    Mutation("bench adapter set-ups install no training hooks", "src/rankwise/bench/kinds.py",
             "return Prepared(optimizer, (AdapterHooks(),))", "return Prepared(optimizer)",
             ("tests/test_bench.py", "-k", "adapter_hooks")),
    Mutation("bench parametrisations are not installed as hooks", "src/rankwise/bench/kinds.py",
             "return Prepared(optimizer, (method,), method.schedule)",
             "return Prepared(optimizer, (), method.schedule)",
             ("tests/test_bench.py", "-k", "installed_as_a_training_hook")),
    Mutation("bench ignores a parametrisation's own schedule", "src/rankwise/bench/runner.py",
             "scheduler = (prepared.schedule or cosine_schedule)(", "scheduler = (cosine_schedule)(",
             ("tests/test_bench_sweep.py", "-k", "own_schedule")),
    Mutation("sweep reports on the split it chose the lr on", "src/rankwise/bench/sweep.py",
             "report_loss = evaluate(model, report) if model is not None else None",
             "report_loss = evaluate(model, workload.eval_data) if model is not None else None",
             ("tests/test_bench_sweep.py", "-k", "grid_then_the_chosen")),
    Mutation("sweep claims an ordering from the mean gap alone", "src/rankwise/bench/sweep.py",
             "if all(g > 0 for g in gaps) and mean > 2 * error:", "if mean > 0:",
             ("tests/test_bench_sweep.py", "-k", "orderings")),
    # ---- the command line
    Mutation("compress command drops --method-args", "src/rankwise/cli/compress.py",
             "loss_fn=loss_fn, **options)", "loss_fn=loss_fn)",
             ("tests/test_cli.py", "-k", "reach_the_compressor")),
]


def tracked_files() -> list[str]:
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    return [name for name in listed.decode().split("\0") if name and (ROOT / name).is_file()]


def copy_tree(files: list[str], destination: Path) -> None:
    for name in files:
        target = destination / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, target)


def environment(copy: Path) -> dict[str, str]:
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    env["PYTHONPATH"] = os.pathsep.join([str(copy / "src"), *filter(None, [env.get("PYTHONPATH")])])
    return env


def check_imports_the_copy(copy: Path) -> None:
    found = subprocess.run([sys.executable, "-c", "import rankwise; print(rankwise.__file__)"], cwd=copy,
                           env=environment(copy), capture_output=True, text=True, check=True).stdout.strip()
    if not Path(found).resolve().is_relative_to((copy / "src").resolve()):
        raise SystemExit(f"the scratch copy's rankwise is not the one imported ({found}); check PYTHONPATH")


def run_tests(copy: Path, tests: tuple[str, ...]) -> tuple[int | None, str]:
    """pytest's exit status (None on timeout) and the tail of its output."""
    command = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests]
    try:
        done = subprocess.run(command, cwd=copy, env=environment(copy), capture_output=True, text=True,
                              timeout=TIMEOUT_SECONDS)
    except subprocess.TimeoutExpired:
        return None, f"timed out after {TIMEOUT_SECONDS} s"
    return done.returncode, "\n".join((done.stdout + done.stderr).strip().splitlines()[-3:])


def apply(mutation: Mutation, copy: Path) -> str | None:
    """Make the replacement in ``copy``; the reason it cannot be made, or None."""
    path = copy / mutation.file
    if not path.is_file():
        return f"{mutation.file} does not exist"
    text = path.read_text()
    count = text.count(mutation.original)
    if count != 1:
        return f"the original text occurs {count} times in {mutation.file} (expected once): update the entry"
    path.write_text(text.replace(mutation.original, mutation.replacement))
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", action="append", metavar="NAME", help="run only this mutation (repeatable)")
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    args = parser.parse_args(argv)
    if args.list:
        for mutation in MUTATIONS:
            print(f"{mutation.name}  [{mutation.file}; {' '.join(mutation.tests)}]")
        return 0
    chosen = [m for m in MUTATIONS if not args.only or m.name in args.only]
    unknown = sorted(set(args.only or ()) - {m.name for m in MUTATIONS})
    if unknown:
        parser.error(f"unknown mutation(s) {unknown}; see --list")

    files = tracked_files()
    failures = 0
    with tempfile.TemporaryDirectory(prefix="rankwise-mutation-") as scratch:
        baseline = Path(scratch) / "baseline"
        copy_tree(files, baseline)
        check_imports_the_copy(baseline)
        selections = list(dict.fromkeys(m.tests for m in chosen))
        for tests in selections:
            status, tail = run_tests(baseline, tests)
            if status != 0:
                print(f"BASELINE FAILS  {' '.join(tests)} (pytest exit {status}): {tail}")
                return 1
        print(f"baseline: the {len(selections)} test selections pass unmutated")
        for index, mutation in enumerate(chosen):
            copy = Path(scratch) / f"mutant-{index}"
            copy_tree(files, copy)
            started = time.perf_counter()
            problem = apply(mutation, copy)
            if problem is not None:
                verdict = f"ORIGINAL NOT FOUND ({problem})"
            else:
                status, tail = run_tests(copy, mutation.tests)
                verdict = {1: "caught"}.get(status, f"NOT caught (pytest exit {status}: {tail})")
            shutil.rmtree(copy, ignore_errors=True)
            failures += verdict != "caught"
            print(f"{mutation.name}: {verdict}  ({time.perf_counter() - started:.0f} s)", flush=True)
    print(f"{len(chosen) - failures} of {len(chosen)} mutations caught")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
