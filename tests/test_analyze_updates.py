"""What a fine-tune changed: intruder dimensions (PEFT as the oracle for the count), their
mitigation, update spectra and principal angles between updates."""

from __future__ import annotations

import copy
import math
import re

import pytest
import torch
from torch import nn

from cases.analyze_updates import N, SPECTRUM, base_and_bases, rank_one_intruder, small_noise, two_intruders
from rankwise.analyze import intruder_dimensions, mitigate_intruders, subspace_overlap, update_spectrum
from rankwise.analyze.intruders import mitigated_weight
from rankwise.errors import RankwiseError


def pair_of_models(base: torch.Tensor, tuned: torch.Tensor) -> tuple[nn.Module, nn.Module]:
    def model(weights):
        layers = nn.Sequential(*(nn.Linear(w.shape[1], w.shape[0], bias=False, dtype=w.dtype) for w in weights))
        with torch.no_grad():
            for layer, w in zip(layers, weights):
                layer.weight.copy_(w)
        return layers

    w0_noise, w1_noise = small_noise()
    return model([base, w0_noise]), model([tuned, w1_noise])


def test_intruders_report_their_similarities():
    w0, w1 = rank_one_intruder()
    found = intruder_dimensions(w0, w1)
    assert found.count == 1 and found.indices == (0,) and len(found.similarities) == 10
    # the intruder is spread evenly over 16 base directions: |cos| ~ 1/4 with each
    assert found.similarities[0] == pytest.approx(0.25, abs=0.05)
    assert min(found.similarities[1:]) > 0.9  # the rest are the base's own top directions
    assert intruder_dimensions(w0, w1, k=40).similarities.__len__() == N  # k capped at min(m, n)


def test_intruder_count_matches_peft(llama):
    """PEFT's reduce_intruder_dimension logs the intruders it finds per LoRA layer: the oracle."""
    peft = pytest.importorskip("peft")
    from peft.tuners.lora.intruders import reduce_intruder_dimension

    torch.manual_seed(0)
    base = copy.deepcopy(llama)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model = peft.get_peft_model(llama, config)
    with torch.no_grad():  # large updates: some layers get intruders, the PEFT init alone gives none
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.mul_(200.0 if ".0." in name else 0.01)
    merged = copy.deepcopy(model).merge_and_unload()
    lines = []
    reduce_intruder_dimension(model, logging_sink=lines.append)
    peft_counts = {}
    for line in lines:
        match = re.match(r"base_model\.model\.(\S+): (?:Intruders: (\d+)|No intruders)", line)
        if match:
            peft_counts[match.group(1)] = int(match.group(2) or 0)
    assert len(peft_counts) == 4 and any(peft_counts.values()) and not all(peft_counts.values())
    for name, expected in peft_counts.items():
        found = intruder_dimensions(base.get_submodule(name), merged.get_submodule(name))
        assert found.count == expected, name


def test_mitigation_scales_exactly_the_intruder_components():
    w0, w1 = two_intruders()
    found = intruder_dimensions(w0, w1)
    mitigated, count = mitigated_weight(w0, w1, lam=0.75)
    assert count == found.count == 2
    u, s, vh = torch.linalg.svd(w1)
    expected = w1 - 0.25 * sum(s[i] * torch.outer(u[:, i], vh[i]) for i in found.indices)
    torch.testing.assert_close(mitigated, expected, rtol=1e-10, atol=1e-10)
    # the intruders' singular values become 0.75 of what they were; the others stay
    after = torch.linalg.svdvals(mitigated)
    before = s.tolist()
    intruding = sorted([0.75 * before[i] for i in found.indices] + [v for i, v in enumerate(before)
                                                                    if i not in found.indices], reverse=True)
    torch.testing.assert_close(after, torch.tensor(intruding, dtype=torch.float64), rtol=1e-9, atol=1e-9)
    assert mitigated_weight(w0, w1, lam=1.0)[0].sub(w1).abs().max() < 1e-12  # lambda = 1: unchanged


def test_mitigate_intruders_writes_only_layers_with_intruders():
    w0, w1 = rank_one_intruder()
    base, tuned = pair_of_models(w0, w1)
    noisy_before = tuned[1].weight.detach().clone()
    counts = mitigate_intruders(tuned, base, lam=0.5)
    assert counts == {"0": 1, "1": 0}
    assert torch.equal(tuned[1].weight, noisy_before)  # no intruders: not rewritten
    assert intruder_dimensions(base[0], tuned[0]).count == 1  # halved, still a new direction
    expected, _ = mitigated_weight(w0, w1, lam=0.5)
    torch.testing.assert_close(tuned[0].weight.detach(), expected, rtol=1e-12, atol=1e-12)
    assert torch.linalg.svdvals(tuned[0].weight.detach())[0] == pytest.approx(
        0.5 * float(torch.linalg.svdvals(w1)[0]), rel=1e-9)


def test_mitigate_intruders_reads_and_writes_conv1d_as_out_x_in(gpt2):
    base = copy.deepcopy(gpt2)
    layer = gpt2.get_submodule("transformer.h.0.attn.c_proj")  # Conv1D, weight stored in x out
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        layer.weight.add_(5.0 * torch.outer(torch.randn(32, generator=gen), torch.randn(32, generator=gen)))
    tuned_matrix = layer.weight.detach().T.clone()
    base_matrix = base.get_submodule("transformer.h.0.attn.c_proj").weight.detach().T
    counts = mitigate_intruders(gpt2, base, targets=["attn.c_proj"])
    assert counts["transformer.h.0.attn.c_proj"] >= 1 and counts["transformer.h.1.attn.c_proj"] == 0
    expected, _ = mitigated_weight(base_matrix, tuned_matrix)
    torch.testing.assert_close(layer.weight.detach().T, expected.float(), rtol=1e-5, atol=1e-6)


def test_mitigate_intruders_refuses_adapter_layers_and_changes_nothing(llama):
    import rankwise

    base = copy.deepcopy(llama)
    with torch.no_grad():
        llama.model.layers[0].mlp.up_proj.weight.add_(3.0)
    rankwise.adapt(llama, "lora", rank=2, targets=["q_proj"])
    state = {k: v.clone() for k, v in llama.state_dict().items()}
    with pytest.raises(RankwiseError, match="merge adapters with rankwise.unload"):
        mitigate_intruders(llama, base)
    assert all(torch.equal(state[k], v) for k, v in llama.state_dict().items())
    with pytest.raises(RankwiseError, match="lam must be a number >= 0"):
        mitigate_intruders(base, base, lam=-1.0)
    with pytest.raises(RankwiseError, match="no counterpart in the base model"):
        mitigate_intruders(llama, nn.Sequential(nn.Linear(4, 4)))


def test_intruder_dimensions_rejects_bad_input():
    w0, w1 = small_noise()
    with pytest.raises(RankwiseError, match="differ in shape"):
        intruder_dimensions(w0, w1[:, :-1])
    with pytest.raises(RankwiseError, match=r"epsilon must be a number in \(0, 1\]"):
        intruder_dimensions(w0, w1, epsilon=0.0)
    with pytest.raises(RankwiseError, match="k must be an integer >= 1"):
        intruder_dimensions(w0, w1, k=0)


def test_update_spectrum_of_matrices_and_of_models():
    w0, w1 = rank_one_intruder(scale=7.0)
    spectrum = update_spectrum(w0, w1)
    assert spectrum[0] == pytest.approx(7.0, rel=1e-6) and spectrum[1:].abs().max() < 1e-5  # a rank-1 update
    base, tuned = pair_of_models(w0, w1)
    per_layer = update_spectrum(base, tuned)
    assert list(per_layer) == ["0", "1"]
    torch.testing.assert_close(per_layer["0"], torch.linalg.svdvals(w1 - w0).float())
    noise0, noise1 = small_noise()
    assert float(per_layer["1"].pow(2).sum().sqrt()) == pytest.approx(1e-3, rel=1e-5)
    assert update_spectrum(base[1], tuned[1]).shape == (N,)
    with pytest.raises(RankwiseError, match="differ in shape"):
        update_spectrum(w0, w1[:3])


def test_subspace_overlap_gives_the_principal_angles():
    q, _ = torch.linalg.qr(torch.randn(20, 20, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    e = [q[:, i] for i in range(6)]
    a, b = 0.3, 1.1
    first = 5.0 * torch.outer(e[0], e[4]) + 2.0 * torch.outer(e[1], e[5])
    second = (3.0 * torch.outer(math.cos(a) * e[0] + math.sin(a) * e[2], e[4])
              + 1.0 * torch.outer(math.cos(b) * e[1] + math.sin(b) * e[3], e[5]))
    overlap = subspace_overlap(first, second)
    assert overlap.k == 2  # both updates have rank 2
    assert overlap.cosines == pytest.approx((math.cos(a), math.cos(b)), abs=1e-12)
    assert overlap.angles_degrees == pytest.approx((math.degrees(a), math.degrees(b)), abs=1e-6)
    assert overlap.overlap == pytest.approx((math.cos(a) ** 2 + math.cos(b) ** 2) / 2, abs=1e-12)
    assert subspace_overlap(first, second, side="right").overlap == pytest.approx(1.0, abs=1e-12)  # same inputs
    assert subspace_overlap(first, 4.0 * first).overlap == pytest.approx(1.0, abs=1e-12)
    orthogonal = 2.0 * torch.outer(e[2], e[4]) + torch.outer(e[3], e[5])
    assert subspace_overlap(first, orthogonal).overlap == pytest.approx(0.0, abs=1e-12)
    assert subspace_overlap(first, second, k=1).cosines == pytest.approx((math.cos(a),), abs=1e-12)


def test_subspace_overlap_ignores_float32_rounding_in_the_rank():
    """A LoRA update read back as (W0 + BA in float32) - W0 has rounding noise in every direction;
    it must not make the default k the full dimension."""
    gen = torch.Generator().manual_seed(4)
    w0 = torch.randn(64, 64, generator=gen)
    low_rank = 0.05 * torch.randn(64, 3, generator=gen) @ torch.randn(3, 64, generator=gen)
    update = (w0 + low_rank).double() - w0.double()
    other = torch.randn(64, 64, generator=gen, dtype=torch.float64)
    overlap = subspace_overlap(update, other)
    assert overlap.k == 3 and overlap.overlap < 0.3


def test_subspace_overlap_of_random_subspaces_is_k_over_n():
    gen = torch.Generator().manual_seed(3)
    values = [subspace_overlap(torch.randn(200, 8, generator=gen) @ torch.randn(8, 50, generator=gen),
                               torch.randn(200, 8, generator=gen) @ torch.randn(8, 50, generator=gen)).overlap
              for _ in range(5)]
    assert sum(values) / len(values) == pytest.approx(8 / 200, rel=0.3)


def test_subspace_overlap_rejects_bad_input():
    with pytest.raises(RankwiseError, match="all-zero update"):
        subspace_overlap(torch.zeros(4, 4), torch.eye(4))
    with pytest.raises(RankwiseError, match="side must be"):
        subspace_overlap(torch.eye(4), torch.eye(4), side="up")
    with pytest.raises(RankwiseError, match=r"k must be an integer in \[1, 4\]"):
        subspace_overlap(torch.eye(4), torch.eye(4), k=5)


def test_constructed_base_has_the_stated_spectrum():
    w0, _, _ = base_and_bases()
    torch.testing.assert_close(torch.linalg.svdvals(w0), torch.tensor(SPECTRUM, dtype=torch.float64))
