"""Work shared across ``torch.distributed`` ranks: who solves what, and handing every rank all the results.

Each rank runs the same block walk; the solves of a block (and the first pass's tables) are dealt out by
estimated cost, the same deal on every rank without talking, and after each block every rank receives
what the others solved, so all of them end with the full compressed model. Outside an initialised
process group this process is rank 0 of 1: it is dealt every solve and the exchanges return what they get.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch import nn

from spadi_ao.layer import LayerReport

__all__ = [
    "UnitShape",
    "rank_and_world",
    "solve_cost",
    "solve_costs",
    "deal_solves",
    "exchange_layers",
    "exchange_tables",
]


class UnitShape(NamedTuple):
    """A solve's size for dealing it: a group is one solve of its stacked outputs."""

    out_features: int
    in_features: int


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the number of ranks (0 and 1 outside an initialised process group)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def solve_cost(linear: nn.Linear) -> float:
    """A FLOP count of one Linear's solve, to balance ranks before anything is measured: the whitening's
    float64 Cholesky and ``U W^T`` (``in^3 / 3 + 2 in^2 out``), plus ``4 max min^2 + 8 min^3`` for the
    solve on the whitened ``in x out`` weight: its smaller Gram and the coding GEMMs (``2 max min^2`` each,
    with ``k`` near ``min / 2``) and that Gram's eigendecomposition (``~8 min^3``)."""
    width, height = linear.in_features, linear.out_features
    small, large = sorted((width, height))
    return 4 * large * small**2 + 8 * small**3 + width**3 / 3 + 2 * width**2 * height


def solve_costs(linears: list[nn.Linear | UnitShape], measured: dict[tuple[int, int], float]) -> list[float]:
    """Seconds an earlier block took for the same shapes when all of them have been seen (a decoder repeats
    its blocks; the float64/float32 speed ratio of the machine is in them), else :func:`solve_cost`."""
    shapes = [(linear.out_features, linear.in_features) for linear in linears]
    if all(shape in measured for shape in shapes):
        return [measured[shape] for shape in shapes]
    return [solve_cost(linear) for linear in linears]


def deal_solves(costs: list[float], world: int) -> list[int]:
    """The rank of each job: longest first, each to the least-loaded rank (ties: earlier job, lower rank).

    Deterministic, so every rank computes the same assignment without talking. Round-robin would give a
    Llama block's three equal MLP solves two to one rank out of two; this pairs gate/up against down plus
    attention (measured in ``benchmarks/scale.py --parts speedup``).
    """
    loads = [0.0] * world
    owners = [0] * len(costs)
    for job in sorted(range(len(costs)), key=lambda j: (-costs[j], j)):
        rank = min(range(world), key=lambda r: (loads[r], r))
        owners[job] = rank
        loads[rank] += costs[job]
    return owners


def exchange_layers(
    results: dict[str, tuple[torch.Tensor, LayerReport]], names: list[str]
) -> dict[str, tuple[torch.Tensor, LayerReport]]:
    """Every rank contributes the layers it solved; every rank receives them all.

    Each layer's layout (serialization manifest, inner shapes and dtypes, report) goes round as one small
    object exchange; the inner tensors are then broadcast from the rank that solved them, never pickled:
    for a 1B block's ~110 MiB of compressed weights, 0.05 s instead of 0.45 s with ``all_gather_object``.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return results
    from spadi_ao.serialization import flatten_state_dict, unflatten_state_dict

    rank = dist.get_rank()
    wire = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    local, layouts = {}, {}
    for name, (weight, report) in results.items():
        local[name], manifest = flatten_state_dict({"weight": weight.cpu()})
        layouts[name] = (manifest, report, {key: (tuple(t.shape), t.dtype) for key, t in local[name].items()})
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, layouts)
    owner_of = {name: owner for owner, part in enumerate(gathered) for name in part}
    missing = set(names) - set(owner_of)
    if missing:
        raise RuntimeError(f"distributed solve lost layers {sorted(missing)}")
    merged: dict[str, tuple[torch.Tensor, LayerReport]] = {}
    for name in names:  # the same order on every rank: the broadcasts pair up
        owner = owner_of[name]
        manifest, report, specs = gathered[owner][name]
        tensors = {}
        for key, (shape, dtype) in sorted(specs.items()):
            tensor = local[name][key].to(wire) if owner == rank else torch.empty(shape, dtype=dtype, device=wire)
            dist.broadcast(tensor, src=owner)
            tensors[key] = tensor.cpu()
        merged[name] = results[name] if owner == rank else (unflatten_state_dict(tensors, manifest)["weight"], report)
    return merged


def exchange_tables(tables: dict[str, dict], labels: list[str]) -> dict[str, dict]:
    """Every rank contributes the tables it computed (a few floats per candidate); every rank receives them all."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tables
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, tables)
    merged = {label: table for part in gathered for label, table in part.items()}
    missing = set(labels) - set(merged)
    if missing:
        raise RuntimeError(f"distributed allocation survey lost units {sorted(missing)}")
    return {label: merged[label] for label in labels}
