"""Device mesh and shardings: a `data` axis (splits the batch), an `fsdp` axis (batch and state).

The batch is split over both axes; every parameter, EMA and optimizer-state array big enough is
split along one dimension over `fsdp` (and replicated over `data`), so per-device state memory
shrinks ~1/fsdp. XLA (GSPMD, Auto axes) inserts the all-gathers and reduce-scatters.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXES = ("data", "fsdp")  # the batch dimension is split over both mesh axes


def make_mesh(data: int = -1, fsdp: int = 1, devices: list | None = None) -> Mesh:
    """A (data, fsdp) mesh over `devices` (default: all devices of all processes).

    data: data-parallel size, -1 = number of devices // fsdp. fsdp: state-sharding size.
    """
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    if fsdp < 1 or n % fsdp:
        raise ValueError(f"config.mesh.fsdp={fsdp} must be >= 1 and divide the {n} devices")
    if data == -1:
        data = n // fsdp
    if data * fsdp != n:
        raise ValueError(f"config.mesh.data={data} x config.mesh.fsdp={fsdp} must equal the "
                         f"number of devices ({n}); set data=-1 to use all of them")
    return jax.make_mesh((data, fsdp), ("data", "fsdp"), devices=devices,
                         axis_types=(AxisType.Auto, AxisType.Auto))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over every device, other dimensions whole."""
    return NamedSharding(mesh, P(DATA_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def fsdp_spec(shape: tuple[int, ...], fsdp: int, min_size: int) -> P:
    """Splits the largest dimension divisible by `fsdp`; small or indivisible arrays replicate.

    Small arrays (biases, norms, scalars) are not worth a collective each.
    """
    if fsdp == 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
        return P()
    for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
        if shape[axis] % fsdp == 0:
            return P(*([None] * axis + ["fsdp"]))
    return P()


def state_shardings(mesh: Mesh, abstract_state: Any, min_size: int = 2**14) -> Any:
    """NamedShardings for a pytree of arrays/ShapeDtypeStructs, by `fsdp_spec` of each shape.

    Optimizer moments and accumulated gradients have the params' shapes, so they are split
    the same way as the params they belong to.
    """
    fsdp = mesh.shape["fsdp"]
    return jax.tree.map(
        lambda x: NamedSharding(mesh, fsdp_spec(tuple(x.shape), fsdp, min_size)), abstract_state)


def per_device_bytes(tree: Any) -> dict[Any, int]:
    """Bytes each device holds of a pytree of jax.Arrays (addressable shards only)."""
    total: dict[Any, int] = {}
    for leaf in jax.tree.leaves(tree):
        for shard in leaf.addressable_shards:
            total[shard.device] = total.get(shard.device, 0) + shard.data.nbytes
    return total
