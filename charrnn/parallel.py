"""Data parallelism with JAX's own machinery: a ``data`` mesh axis over every device of every
process, ``jax.distributed`` across hosts, and XLA's collectives for the gradient mean.

One device is the special case of the same code path: a mesh of size one.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Optional

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from charrnn.config import GATES, ModelConfig
from charrnn.errors import CharrnnError

log = logging.getLogger(__name__)
AXIS = "data"
# A process that stops answering is declared dead after this long, and the others exit with an
# error instead of waiting forever in a collective.
HEARTBEAT_S = int(os.environ.get("CHARRNN_HEARTBEAT_S", "30"))


def initialize(coordinator: Optional[str] = None, num_processes: Optional[int] = None,
               process_id: Optional[int] = None, auto: bool = False) -> None:
    """Join a multi-process run through ``jax.distributed.initialize``.

    With ``coordinator`` (``HOST:PORT``), ``num_processes`` and ``process_id`` given explicitly;
    with ``auto``, JAX detects the cluster (SLURM, Open MPI, TPU pods, or its ``JAX_COORDINATOR_*``
    environment). Must run before anything touches a device.
    """
    if coordinator is None and not auto:
        return
    if coordinator is not None and (num_processes is None or process_id is None):
        raise CharrnnError("--coordinator needs --num-processes and --process-id")
    try:
        if coordinator is not None:
            jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                                       process_id=process_id, initialization_timeout=120,
                                       heartbeat_timeout_seconds=HEARTBEAT_S)
        else:
            jax.distributed.initialize(heartbeat_timeout_seconds=HEARTBEAT_S)
    except (RuntimeError, ValueError) as e:
        raise CharrnnError(f"cannot join the distributed run: {e}") from None
    log.info("process %d of %d, %d devices in all", jax.process_index(), jax.process_count(), jax.device_count())


MIN_ROWS_PER_DEVICE = 8


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def auto_cpu_devices(batch_size: int, cores: Optional[int] = None) -> int:
    """How many CPU devices to split this machine into for a batch of ``batch_size`` streams.

    On CPU, XLA runs each time step of a recurrent loop as a chain of small operations that one
    core cannot keep busy with another's help (intra-op threads barely help matmuls this small),
    while two devices each running half the streams on their own core do more (measured on 2
    cores, LSTM 2x128: ~41k -> ~57k chars/s; RNN 1x512: ~46k -> ~61k; LSTM 2x512: ~4.0k ->
    ~4.9k; not 2x: the devices wait for each other at the gradient all-reduce). So: one device
    per core, as long as the batch divides evenly and every device keeps at least
    ``MIN_ROWS_PER_DEVICE`` streams.
    """
    cores = cores or usable_cores()
    for n in range(min(cores, batch_size // MIN_ROWS_PER_DEVICE), 1, -1):
        if batch_size % n == 0:
            return n
    return 1


def step_weight_bytes(cell: str, layers: int, hidden: int, vocab_size: int) -> int:
    """Bytes of float32 weight matrices one sampling step multiplies by: every layer's ``w_hh``,
    the upper layers' ``w_ih`` (the first layer's is a row gather) and the output layer."""
    g = GATES[cell] * hidden
    return 4 * (layers * hidden * g + (layers - 1) * hidden * g + hidden * vocab_size)


def l2_cache_bytes(default: int = 1 << 20) -> int:
    """One core's L2 cache size (Linux sysfs), or ``default`` where it cannot be read."""
    try:
        text = open("/sys/devices/system/cpu/cpu0/cache/index2/size").read().strip().upper()
        units = {"K": 1 << 10, "M": 1 << 20}
        return int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)
    except (OSError, ValueError, IndexError):
        return default


def sampling_devices(batch_size: int, weight_bytes: int, cores: Optional[int] = None,
                     l2_bytes: Optional[int] = None) -> int:
    """How many CPU devices to sample ``batch_size`` rows on (``sample.make_sampler``'s mesh).

    Sampling needs no communication between devices, so splitting the rows pays as long as
    each core can keep the weights a step reads (``weight_bytes``) in its own L2 cache; beyond
    that the cores compete for the shared cache and one device (with intra-op threads) wins.
    Measured on 2 cores with 2 MiB of L2 each, batch 32, 2 devices vs 1 (separate processes,
    twice): LSTM 2x128 (0.8 MiB of weights) 1.6-1.8x, RNN 1x512 (1.1 MiB) 1.25-1.9x, GRU 2x256
    (2.3 MiB) 1.4x, LSTM 2x256 (3 MiB) 1.2-1.3x, GRU 1x512 (3 MiB) 0.8-1.1x, LSTM 2x512
    (12 MiB) ~0.7x. So, erring towards one device: ``auto_cpu_devices`` when the weights are
    at most 1.25x one core's L2 cache, else one device.
    """
    if weight_bytes > 1.25 * (l2_bytes or l2_cache_bytes()):
        return 1
    return auto_cpu_devices(batch_size, cores)


def sampling_threads(weight_bytes: int, cores: Optional[int] = None, l2_bytes: Optional[int] = None) -> int:
    """How many threads one device's sampling step splits its columns over (the native step
    kernel, ``charrnn.step_kernel``), when that device samples alone on the machine.

    Where the weights fit one core's L2 cache one thread wins (a step is a few microseconds and
    handing half of it to another core costs about as much; at batch 32 ``sampling_devices``
    splits the rows over devices instead). Where they do not fit, each core keeps its half of
    every weight in its own L2. One device, batch 1, per step (median of 7 runs of 1,000 steps;
    1 thread / 2 threads / XLA's dots): GRU 2x256 (2.4 MB) 110 / 39 / 110 us, LSTM 2x512 (12 MB)
    894 / 581 / 1,510 us, LSTM 2x128 (0.8 MB) 18 / 58 / 57 us, RNN 1x512 (1.2 MB) 23 / 29 / 31
    us; LSTM 2x512 at batch 32 5.5 / 3.3 / 6.3 ms (2 MB of L2 per core).
    """
    if weight_bytes > (l2_bytes or l2_cache_bytes()):
        return cores or usable_cores()
    return 1


def sampling_devices_for(model: ModelConfig, vocab_size: int, batch_size: int,
                         cores: Optional[int] = None, l2_bytes: Optional[int] = None) -> int:
    """``sampling_devices`` for a model of this shape: the one rule ``charrnn sample`` (before
    JAX starts), ``Run.sampling_devices`` and the benchmark all apply."""
    weights = step_weight_bytes(model.cell, model.layers, model.hidden, vocab_size)
    return sampling_devices(batch_size, weights, cores, l2_bytes)


def local_mesh(n: int) -> jax.sharding.Mesh:
    """A 1-D ``data`` mesh over this process's first ``n`` devices (for sampling)."""
    return jax.sharding.Mesh(np.array(jax.local_devices()[:n]), (AXIS,))


def data_mesh() -> jax.sharding.Mesh:
    """The 1-D ``data`` mesh over every device of every process (``DataParallel`` places on it,
    and the train step's ``shard_map`` runs on it)."""
    return jax.make_mesh((jax.device_count(),), (AXIS,), axis_types=(jax.sharding.AxisType.Auto,),
                         devices=jax.devices())


class DataParallel:
    """Placement of training state over a 1-D ``data`` mesh spanning all devices.

    Parameters and optimizer state are replicated; the batch's streams (rows) and the carried
    hidden state are split over the devices. Each process supplies only the rows its own
    devices hold.
    """

    def __init__(self, batch_size: int):
        devices = jax.devices()
        n = len(devices)
        if batch_size % n:
            raise CharrnnError(f"--batch-size {batch_size} must divide by the number of devices ({n}); "
                               f"try --batch-size {max(n, batch_size // n * n)}")
        self.mesh = data_mesh()
        self.replicated = NamedSharding(self.mesh, P())
        self.rows = NamedSharding(self.mesh, P(AXIS))
        self.batch_size = batch_size
        per_process = batch_size // jax.process_count()
        self.local_rows = slice(jax.process_index() * per_process, (jax.process_index() + 1) * per_process)

    @property
    def is_main(self) -> bool:
        """Only the first process writes files and prints."""
        return jax.process_index() == 0

    def replicate(self, tree):
        return jax.device_put(tree, self.replicated)

    def shard_rows(self, tree_local):
        """Global arrays from this process's rows (leading axis) of every leaf."""
        return jax.tree_util.tree_map(
            lambda a: jax.make_array_from_process_local_data(self.rows, np.asarray(a)), tree_local)

    def local_part(self, tree_global):
        """This process's rows of a full-batch tree (e.g. a checkpoint's carried state)."""
        return jax.tree_util.tree_map(lambda a: np.asarray(a)[self.local_rows], tree_global)

    def to_host(self, tree) -> Any:
        """Every leaf as a full numpy array on every process (gathers rows across processes)."""
        if jax.process_count() == 1:
            return jax.device_get(tree)
        return multihost_utils.process_allgather(tree, tiled=True)

    def local_copy(self, tree):
        """A replicated tree's local copy on one device of this process (for eval and sampling)."""
        return jax.tree_util.tree_map(lambda a: a.addressable_data(0), tree)

    def any(self, flag: bool) -> bool:
        """True on every process when ``flag`` is true on any (agreeing on when to stop)."""
        if jax.process_count() == 1:
            return flag
        return bool(np.any(multihost_utils.process_allgather(np.array([flag]))))
