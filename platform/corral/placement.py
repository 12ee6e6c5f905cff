"""Reserving a cluster's resources before work starts, with a deadline and an error that says what
did not fit. Ray Train and bare actors otherwise wait for resources forever, silently."""

from __future__ import annotations

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group


class PlacementFailed(RuntimeError):
    """The cluster could not place a reservation in time."""


def bundle(cpus: float, gpus: float = 0, accelerator_type: str | None = None) -> dict[str, float]:
    """One worker's resources, as Ray names them (an accelerator type is a tiny custom resource)."""
    out = {"CPU": cpus} | ({"GPU": gpus} if gpus else {})
    return out | ({f"accelerator_type:{accelerator_type}": 0.001} if accelerator_type else {})


def reserve(bundles: list[dict], strategy: str, timeout_s: float | None, what: str, advice: str,
            name: str = "") -> PlacementGroup:
    """A placement group of `bundles`, once the cluster has placed it; `PlacementFailed` naming
    `what`, the request, the cluster's free resources and `advice` if it has not after `timeout_s`
    (None waits as long as it takes: an autoscaler may be adding nodes)."""
    if not ray.is_initialized():
        ray.init()  # as Ray Train and actors do: the cluster RAY_ADDRESS names, or a new local one
    pg = placement_group([dict(b) for b in bundles], strategy=strategy, name=name)
    try:
        ray.get(pg.ready(), timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        remove_placement_group(pg)
        free = {k: round(v, 2) for k, v in ray.available_resources().items() if not k.startswith("node:")
                and "memory" not in k}
        raise PlacementFailed(f"{what}: the cluster cannot place {len(bundles)} x {bundles[0]} ({strategy}) within "
                              f"{timeout_s:.0f}s; free now: {free}. {advice}") from None
    return pg
