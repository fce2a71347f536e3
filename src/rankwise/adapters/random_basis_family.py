"""What the random-basis and shared adapters share (VeRA, RandLoRA, Uni-LoRA, NOLA, ...):
frozen random tensors regenerated from stored seeds.

These methods train a few scalars (scaling vectors, mixing coefficients, one global vector)
that act on large FROZEN random tensors (projections, bases, index maps). An adapter file
that stored those tensors would be mostly noise, many times the size of what was trained.
Here the file holds the trainable parameters and the options (the ``seed`` among them), not
the random tensors:

- every frozen random tensor is drawn by :meth:`RandomBasisLayer.make_shared` from the
  ``seed`` option alone, with a CPU ``torch.Generator`` (:func:`seeded_generator`), in float32,
  and only then moved to the base's device and compute dtype (:func:`placed`). CPU and CUDA
  random streams differ; drawing on the CPU makes the tensors the same on every device, and
  drawing in float32 makes them the same for every dtype up to the final rounding.
- ``make_shared`` runs in ``adapt`` and again in ``load_adapter`` (with the same layers, the
  same options and -- for these methods -- the same rank), so loading regenerates the same
  tensors bit for bit; tensors that depend on the set of adapted layers (largest shapes,
  Uni-LoRA's global index map) are computed over the layer names in sorted order, so they
  do not depend on the order the layers are listed in.
- a layer registers them with :meth:`RandomBasisLayer.frozen`, as NON-persistent buffers:
  they move with ``model.to(...)`` but are not in ``state_dict``, so ``save_adapter`` never
  writes them. Tensors keyed ``"<layer name>/<tensor>"`` in the shared dict belong to one
  layer (NOLA's per-layer bases); the others are shared by every layer (VeRA's ``A`` and ``B``).

Cost: regeneration takes the time of drawing the tensors again (milliseconds for the bases
of a 7B model's attention projections on CPU); ``model.to(device)`` copies a shared buffer once
per layer that holds it.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

import torch
from torch import nn

from rankwise.adapters.base import AdapterLayer
from rankwise.layers import compute_dtype, features
from rankwise.options import Option

SEED = Option(0, int, low=0, help="seed of the frozen random tensors (they are regenerated from it, never saved)")


def seeded_generator(seed: int, *labels: str) -> torch.Generator:
    """A CPU generator seeded by ``seed`` and ``labels`` through a stable hash (SHA-256), so a
    per-layer tensor labelled by its layer name is the same in every process and run."""
    if not labels:
        return torch.Generator(device="cpu").manual_seed(seed)
    digest = hashlib.sha256("\x00".join((str(seed), *labels)).encode()).digest()
    return torch.Generator(device="cpu").manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def kaiming_uniform(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """``U(-b, b)`` with ``b = sqrt(6 / fan_in)`` (He et al. 2015, gain ``sqrt 2``), ``fan_in`` =
    the product of all but the first dimension, drawn in float32 on the CPU."""
    fan_in = math.prod(shape[1:])
    bound = math.sqrt(6.0 / fan_in)
    return torch.empty(shape, dtype=torch.float32).uniform_(-bound, bound, generator=generator)


def placed(tensor: torch.Tensor, factory: dict[str, Any]) -> torch.Tensor:
    """A CPU float32 draw moved to ``factory``'s device and dtype (the only rounding is the cast)."""
    return tensor.to(device=factory["device"], dtype=factory["dtype"])


def shared_factory(bases: dict[str, nn.Module]) -> dict[str, Any]:
    """Device and compute dtype for tensors shared by ``bases`` (those of the first, in name order)."""
    first = bases[min(bases)]
    return {"device": first.weight.device, "dtype": compute_dtype(first)}


def largest_shape(bases: dict[str, nn.Module]) -> tuple[int, int]:
    """``(max out, max in)`` over the adapted layers: shared tensors are sliced to each layer's shape."""
    shapes = [features(base) for base in bases.values()]
    return max(out for out, _ in shapes), max(inp for _, inp in shapes)


def layer_key(layer_name: str, tensor: str) -> str:
    """Key of one layer's own tensor in the shared dict."""
    return f"{layer_name}/{tensor}"


class RandomBasisLayer(AdapterLayer):
    """An adapter whose frozen tensors come from :meth:`make_shared` (drawn from ``seed``) and are
    registered with :meth:`frozen` (non-persistent: never saved, regenerated on load)."""

    OPTIONS = {"seed": SEED}

    def frozen(self, name: str, key: str | None = None) -> torch.Tensor:
        """Register ``self.shared[key]`` (default ``name``; a per-layer key by :func:`layer_key`) as the
        non-persistent buffer ``name``; returns it."""
        tensor = self.shared[key or name]
        self.register_buffer(name, tensor, persistent=False)
        return tensor

    def own_key(self, tensor: str) -> str:
        return layer_key(self.name, tensor)


class GeneratedLoraLayer(RandomBasisLayer):
    """A random-basis adapter whose update is a LoRA pair generated from its trainable values:
    ``delta W = s B A`` with ``(B, A) = factors()`` (NOLA's basis mixtures, MoS's shards,
    Uni-LoRA's rows of ``P theta_d``), applied as ``s B (A x)`` without forming ``delta W``."""

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, A)`` (``out x r``, ``r x in``) built from the trainable values."""
        raise NotImplementedError

    def delta_weight(self) -> torch.Tensor:
        up, down = self.factors()
        return self.scaling * (up @ down)

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        up, down = self.factors()
        return self.project_out(self.project_in(x, down), up) * self.scaling

    def lora_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(s B, A)`` in fp32: the update is exactly rank-r factored."""
        up, down = (factor.detach().float() for factor in self.factors())
        return self.scaling * up, down
