"""Trains BSMamba2 (vocals) with the paper's recipe (docs/DESIGN.md#loss-and-recipe).

    python train.py --config=configs/bsmamba2.py --workdir=workdir/paper
    python train.py --config=configs/bsmamba2.py:demo --workdir=workdir/demo \
        --config.total_steps=100

Resumes from the newest checkpoint in --workdir. SIGTERM/SIGINT save a checkpoint and exit 0.
Multi-process (one process per host or per GPU): pass --coordinator_address, --num_processes and
--process_id (or set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID); under SLURM
(`srun`, more than one task) JAX detects them itself. Every process runs this same command.
"""

from __future__ import annotations

import functools
import hashlib
import logging as std_logging
import os
import signal
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags, logging
from jax.experimental import multihost_utils
from ml_collections import config_flags

from bsmamba2_jax import data as data_lib
from bsmamba2_jax.losses import separation_loss
from bsmamba2_jax.model import BSMamba2
from bsmamba2_jax.train import checkpoint as ckpt_lib
from bsmamba2_jax.train import sharding as shard_lib
from bsmamba2_jax.train.optim import make_optimizer
from bsmamba2_jax.train.state import init_train_state
from bsmamba2_jax.train.step import make_eval_step, make_train_step
from bsmamba2_jax.train.validate import validate
from bsmamba2_jax.train.writers import MetricWriter, Progress

config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/bsmamba2.py:demo",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Checkpoints, logs, metrics and the synthetic data go here")
flags.DEFINE_string("coordinator_address", os.environ.get("JAX_COORDINATOR_ADDRESS"),
                    "host:port of process 0, for multi-process runs")
flags.DEFINE_integer("num_processes", int(os.environ.get("JAX_NUM_PROCESSES", "1")),
                     "Processes in a multi-process run")
flags.DEFINE_integer("process_id", int(os.environ.get("JAX_PROCESS_ID", "0")),
                     "This process's index in a multi-process run")
FLAGS = flags.FLAGS


def maybe_initialize_distributed() -> None:
    """jax.distributed.initialize() when a launcher asks for several processes."""
    slurm = int(os.environ.get("SLURM_NTASKS", "1")) > 1
    if FLAGS.num_processes <= 1 and not slurm:
        return
    # CPU processes need a collectives backend to talk; harmless for GPU/TPU runs.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if FLAGS.num_processes > 1:
        jax.distributed.initialize(FLAGS.coordinator_address, num_processes=FLAGS.num_processes,
                                   process_id=FLAGS.process_id)
    else:
        jax.distributed.initialize()  # SLURM: address, count and id from the environment


class StopRequest:
    """Turns SIGTERM/SIGINT into a flag the loop polls, so it can save before exiting."""

    def __init__(self):
        self.requested = False
        self._previous = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        logging.warning("Received signal %d: saving a checkpoint, then exiting", signum)
        self.requested = True

    def agreed(self) -> bool:
        """True once any process was signalled (every process must stop at the same step)."""
        if jax.process_count() == 1:
            return self.requested
        return bool(multihost_utils.process_allgather(np.int32(self.requested)).any())

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | Path) -> dict:
    """Trains (or resumes) to config.total_steps; returns the last validation metrics."""
    workdir = Path(workdir).absolute()
    if config.compilation_cache:
        jax.config.update("jax_compilation_cache_dir", str(workdir / "jax_cache"))
    ckpt_lib.write_config(workdir, config)
    is_main = jax.process_index() == 0
    mesh = shard_lib.make_mesh(config.mesh.data, config.mesh.fsdp)
    global_batch = config.data.batch_size
    if global_batch % mesh.size:
        raise ValueError(f"config.data.batch_size={global_batch} must be a multiple of the "
                         f"{mesh.size} devices")

    # Data: process 0 writes the synthetic set (if no root is given) while the others wait.
    if is_main:
        root = data_lib.prepare_dataset_root(config, workdir)
    multihost_utils.sync_global_devices("dataset ready")
    if not is_main:
        root = data_lib.prepare_dataset_root(config, workdir)
    data_lib.assert_no_split_leakage(config, root)
    data_iter = iter(data_lib.make_train_dataset(
        config, root, seed=config.seed, shard_index=jax.process_index(),
        shard_count=jax.process_count(), cache_dir=workdir))
    val_segments = data_lib.make_validation_segments(config, root, cache_dir=workdir)

    # State: created directly in its sharded layout, or restored from the newest checkpoint.
    model = BSMamba2(**config.model)
    tx = make_optimizer(config)
    samples = int(round(config.data.segment_seconds * config.data.sample_rate))
    init_fn = functools.partial(init_train_state, model, tx,
                                example_audio=jnp.zeros((1, 2, samples), jnp.float32))
    rng = jax.random.PRNGKey(config.seed)
    abstract = jax.eval_shape(init_fn, rng)
    state_sharding = shard_lib.state_shardings(mesh, abstract, config.mesh.fsdp_min_size)
    checkpointer = ckpt_lib.Checkpointer(workdir, config)
    state = checkpointer.restore_latest(
        jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                     abstract, state_sharding), data_iter)
    if state is None:
        state = jax.jit(init_fn, out_shardings=state_sharding)(rng)
    step = int(state.step)
    if is_main:
        n_params = sum(x.size for x in jax.tree.leaves(state.params))
        logging.info("%s at step %d: %d params, mesh %s, %d processes",
                     "Resuming" if step else "Starting", step, n_params, dict(mesh.shape),
                     jax.process_count())

    data_sharding = shard_lib.batch_sharding(mesh)
    replicated = shard_lib.replicated(mesh)
    train_step = jax.jit(
        make_train_step(model, tx, separation_loss, config.ema_decay),
        in_shardings=(state_sharding, data_sharding), out_shardings=(state_sharding, replicated),
        donate_argnums=0)
    eval_step = jax.jit(make_eval_step(model),
                        in_shardings=(state_sharding.ema_params, data_sharding),
                        out_shardings=replicated)

    writer = MetricWriter(workdir, tensorboard=config.tensorboard)
    progress = Progress(step, config.total_steps, global_batch)
    stop = StopRequest()
    val_metrics: dict = {}
    try:
        while step < config.total_steps:
            local = next(data_iter)
            batch = {k: jax.make_array_from_process_local_data(data_sharding, np.asarray(local[k]))
                     for k in ("mixture", "vocals")}
            state, metrics = train_step(state, batch)
            step += 1
            last = step == config.total_steps
            stopping = stop.agreed()

            if step % config.log_every == 0 or last or stopping:
                metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
                if metrics["nonfinite_run"] >= config.max_nonfinite_run:
                    checkpointer.wait()
                    raise FloatingPointError(
                        f"{int(metrics['nonfinite_run'])} micro-batches in a row had a non-finite "
                        f"loss or gradient (step {step}); lower config.optim.lr, use "
                        "config.model.dtype='float32', or resume from an earlier checkpoint")
                line, rate = progress.line(step, {k: metrics[k] for k in ("loss", "grad_norm")})
                if is_main:
                    logging.info(line)
                writer.write(step, {**metrics, "examples_per_s": rate}, prefix="train/")

            if last or stopping or step % config.ckpt_every == 0:
                checkpointer.save(step, state, data_iter, force=True)
            if not stopping and (last or (config.eval_every and step % config.eval_every == 0)):
                checkpointer.wait()  # a failed save must stop the run before more work is done
                val_metrics = validate(eval_step, state.ema_params, val_segments, mesh,
                                       config.eval_batch_size)
                if is_main:
                    logging.info("step %d validation (EMA): %s", step, val_metrics)
                writer.write(step, val_metrics, prefix="val/")
                checkpointer.save_best(step, state, val_metrics["usdr"])
            if stopping:
                logging.warning("Stopped at step %d on request; checkpoint saved", step)
                break
    finally:
        stop.restore()
        writer.close()
        checkpointer.close()  # waits for pending saves and raises if one failed
    if jax.process_count() > 1:  # replicas must agree; compare these lines across processes
        logging.info("process %d params digest %s", jax.process_index(), params_digest(state))
    return val_metrics


def params_digest(state) -> str:
    """SHA-256 of this process's copy of the replicated params (fsdp-split leaves skipped)."""
    digest = hashlib.sha256()
    for leaf in jax.tree.leaves(state.params):
        if leaf.sharding.is_fully_replicated:
            digest.update(np.asarray(leaf.addressable_shards[0].data).tobytes())
    return digest.hexdigest()


def quiet_orbax_logs() -> None:
    """Orbax logs every file it writes at INFO; keep its warnings, drop the rest."""
    logging.get_absl_handler().addFilter(
        lambda r: "/orbax/" not in r.pathname or r.levelno >= std_logging.WARNING)


def main(argv):
    quiet_orbax_logs()
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if FLAGS.workdir is None:
        raise app.UsageError("--workdir is required")
    maybe_initialize_distributed()
    train_and_evaluate(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
    flags.mark_flags_as_required(["config"])
    app.run(main)
