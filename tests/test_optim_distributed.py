"""Distributed correctness: 2 CPU processes (gloo) against single-process training.

One spawn (one process group shared by all cases) runs every scenario (DDP, FSDP2
``fully_shard``, layerwise data parallel with gradient accumulation) for every row of
:data:`ROWS`: each registered optimizer with the hyperparameters of its first row in the
common table (tests/cases/optim_*.py), plus configurations with a distributed path of their
own. Each rank trains on its half of the batch; the ranks' parameters must be identical and
equal single-process training on the concatenated batch to float tolerance (see
DISCONTINUOUS in test_optim_layerwise.py).
"""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import make_batch, make_llama
from test_optim_layerwise import assert_trajectory_close

from cases import collect
from rankwise import optim
from rankwise.errors import RankwiseError
from rankwise.optim.qgalore import int8_weight

WORLD = 2
STEPS = 3
#: row id -> (optimizer name, hyperparameters): every name's first common-suite row under its name
ROWS: dict[str, tuple[str, dict]] = {}
for _case in collect("optim_"):
    ROWS.setdefault(_case.name, (_case.name, _case.hparams))
ROWS.update(
    {
        # INT8 weights: under FSDP2 the gathered full weight is requantised, then its rows written back
        "qgalore-int8": ("qgalore", {"rank": 4, "update_proj_gap": 2, "min_8bit_size": 0, "weight_quant": True}),
        # SGD on the state-free part makes FRUGAL continuous: compared to a tolerance (EXACT_ATOL)
        "frugal-sgd": ("frugal", {"proj": "svd", "update_proj_gap": 2, "state_free": "sgd"}),
    }
)
ROW_IDS = sorted(ROWS)
#: rows compared entry-wise to this tolerance although their method is DISCONTINUOUS in general
EXACT_ATOL = {"frugal-sgd": 5e-5}
MODES = ("ddp", "fsdp", "layerwise")


def global_batch(step: int) -> dict:
    return make_batch(seed=step, batch=2 * WORLD)


def rank_batch(step: int, rank: int) -> dict:
    return {k: v[rank::WORLD] for k, v in global_batch(step).items()}


def build(model, row: str, **kwargs):
    name, hparams = ROWS[row]
    # weight decay exercises the write-back of the full weight too
    return optim.build(model, name, lr=1e-2, **{**hparams, "weight_decay": 0.01}, **kwargs)


def train_ddp(row: str, rank: int) -> dict:
    model = make_llama()
    wrapped = torch.nn.parallel.DistributedDataParallel(model)
    optimizer = build(model, row)
    for step in range(STEPS):
        wrapped(**rank_batch(step, rank)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def train_fsdp(row: str, rank: int) -> dict:
    from torch.distributed.fsdp import fully_shard

    model = make_llama()
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    optimizer = build(model, row)
    for step in range(STEPS):
        model(**rank_batch(step, rank)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    params = {k: v.full_tensor().detach().clone() for k, v in model.state_dict().items()}
    params["state_bytes"] = torch.tensor(optim.state_bytes(optimizer))
    if ROWS[row][1].get("weight_quant"):
        projected = optimizer.param_groups[0]["params"]
        params["int8_error"] = max((int8_weight(optimizer, p) - p.full_tensor()).abs().max() for p in projected)
    return params


def train_layerwise(row: str, rank: int) -> dict:
    model = make_llama(seed=rank)  # different init per rank: layerwise mode must broadcast rank 0's
    optimizer = build(model, row, layerwise=True, accumulation_steps=2)
    for step in range(STEPS):
        batch = rank_batch(step, rank)
        for i in range(2):
            (model(**{k: v[i : i + 1] for k, v in batch.items()}).loss / 2).backward()
            optimizer.step()
            optimizer.zero_grad()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def refusals(rank: int) -> list[str]:
    """Messages of the layerwise set-ups that must be refused (empty string: not refused)."""
    from torch.distributed.fsdp import fully_shard

    messages = []
    ddp = torch.nn.parallel.DistributedDataParallel(make_llama())
    sharded = make_llama()
    fully_shard(sharded)
    for model in (ddp, sharded):
        try:
            optim.build(model, "galore", lr=1e-2, rank=4, layerwise=True)
            messages.append("")
        except RankwiseError as exc:
            messages.append(str(exc))
    return messages


def worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        trainers = {"ddp": train_ddp, "fsdp": train_fsdp, "layerwise": train_layerwise}
        results = {}
        for mode in MODES:
            for row in ROW_IDS:
                try:
                    results[f"{mode}/{row}"] = trainers[mode](row, rank)
                except Exception as exc:  # reported by the test of that pair, the others still run
                    results[f"{mode}/{row}"] = {"error": torch.tensor(list(repr(exc).encode()[:300]))}
        torch.save({"params": results, "refusals": refusals(rank)}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("distributed")
    mp.spawn(worker, args=(free_port(), str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


def single_process(row: str) -> tuple[dict, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = make_llama()
    optimizer = build(model, row)
    for step in range(STEPS):
        model(**global_batch(step)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.state_dict(), optimizer


def test_every_plain_optimizer_has_a_row():
    # Optimizers built from an adapted model (LoRA-Pro) take no plain model and have their own suite.
    plain = {n for n in optim.names() if not getattr(optim.OPTIMIZERS.get(n), "takes_model", False)}
    assert {name for name, _ in ROWS.values()} == plain


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("row", ROW_IDS)
def test_two_ranks_equal_single_process_on_the_concatenated_batch(ranks, mode, row):
    key = f"{mode}/{row}"
    first, second = (r["params"][key] for r in ranks)
    assert "error" not in first, bytes(first["error"].tolist()).decode()
    reference, _ = single_process(row)
    initial = make_llama().state_dict()
    name = ROWS[row][0]
    for param_name, expected in reference.items():
        what = f"{key} {param_name}"
        assert torch.equal(first[param_name], second[param_name]), f"{key}: ranks differ on {param_name}"
        if row in EXACT_ATOL:
            torch.testing.assert_close(first[param_name], expected, rtol=0, atol=EXACT_ATOL[row], msg=what)
        else:
            assert_trajectory_close(first[param_name], expected, initial[param_name], name, atol=2e-5, what=what)
    assert any(not torch.equal(reference[k], initial[k]) for k in reference)


def test_layerwise_refuses_ddp_and_fsdp_models(ranks):
    for messages in (r["refusals"] for r in ranks):
        ddp_message, fsdp_message = messages
        assert "DistributedDataParallel" in ddp_message and "model.module" in ddp_message
        assert "FSDP2" in fsdp_message


def test_fsdp_replicates_projected_state_and_shards_the_rest(ranks):
    """GaLore under FSDP2: each rank holds the full low-rank state of every projected weight
    and its own shard of the AdamW moments of the other parameters."""
    _, optimizer = single_process("galore")
    projected = {id(p) for p in optimizer.param_groups[0]["params"]}
    projected_bytes = sum(v.numel() * v.element_size() for p, st in optimizer.state.items() if id(p) in projected
                          for v in st.values() if isinstance(v, torch.Tensor))
    total = sum(int(r["params"]["fsdp/galore"]["state_bytes"]) for r in ranks)
    assert total == optim.state_bytes(optimizer) + (WORLD - 1) * projected_bytes


def test_fsdp_writes_the_int8_weight_of_the_full_matrix_into_the_shards(ranks):
    """Q-GaLore INT8 weights under FSDP2: the codes are those of the whole matrix (their groups
    span the gathered weight) and each shard holds exactly its rows of their dequantised values."""
    for result in (r["params"]["fsdp/qgalore-int8"] for r in ranks):
        assert "error" not in result, bytes(result["error"].tolist()).decode()
        assert result["int8_error"] == 0
