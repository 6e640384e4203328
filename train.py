"""Trains BSMamba2 (vocals) with the authors' recipe and schedule (docs/DESIGN.md#loss-and-recipe).

    python train.py --config=configs/bsmamba2.py --workdir=workdir/paper
    python train.py --config=configs/bsmamba2.py:demo --workdir=workdir/demo \
        --config.total_steps=100
    python train.py --config=configs/bsmamba2.py --workdir=workdir/finetune \
        --config.init_from=sota_model.ckpt        # start from trained weights, fresh optimizer

A workdir holding a run resumes it from its newest readable checkpoint; its config may change
only in resumable fields (bsmamba2_jax/train/config_check.py: RESUMABLE), any other change is an
error that names the fields. --restart moves the old run aside into WORKDIR/previous_runs/ and
starts over (nothing is deleted). SIGTERM/SIGINT save a checkpoint and exit 0. One launch at a
time writes into a workdir (WORKDIR/run.lock, bsmamba2_jax/train/lock.py); evaluating it meanwhile
is fine.
Multi-process (one process per host or per GPU): pass --coordinator_address, --num_processes and
--process_id (or set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID); under SLURM
(`srun`, more than one task) JAX detects them itself. Every process runs this same command.
"""

from __future__ import annotations

import hashlib
import logging as std_logging
import os
import signal
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import app, flags, logging
from jax.experimental import multihost_utils
from ml_collections import config_flags

from bsmamba2_jax import data as data_lib
from bsmamba2_jax.train import checkpoint as ckpt_lib
from bsmamba2_jax.train import config_check
from bsmamba2_jax.train import lock as lock_lib
from bsmamba2_jax.train import sharding as shard_lib
from bsmamba2_jax.train import workdir as workdir_lib
from bsmamba2_jax.train.build import ShardedParts, TrainParts, build, shard
from bsmamba2_jax.train.state import TrainState
from bsmamba2_jax.train.validate import ExampleWindow, choose_examples, validate
from bsmamba2_jax.train.writers import MetricWriter, Progress

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command line (defined only when run as a script, so tests can import this module
    next to other entry points without their flags colliding)."""
    config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/bsmamba2.py:demo",
                                    lock_config=True)
    flags.DEFINE_string("workdir", None,
                        "Checkpoints, logs, metrics and the synthetic data go here")
    flags.DEFINE_bool("restart", False, "If --workdir holds a run, move it into "
                      "WORKDIR/previous_runs/<time>/ and start a new one (nothing is deleted)")
    flags.DEFINE_string("coordinator_address", os.environ.get("JAX_COORDINATOR_ADDRESS"),
                        "host:port of process 0, for multi-process runs")
    flags.DEFINE_integer("num_processes", int(os.environ.get("JAX_NUM_PROCESSES", "1")),
                         "Processes in a multi-process run")
    flags.DEFINE_integer("process_id", int(os.environ.get("JAX_PROCESS_ID", "0")),
                         "This process's index in a multi-process run")


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

    def agreed(self, boundary: bool) -> bool:
        """True once this process (single-process run) or any process was signalled.

        Every process must stop at the same step, so several processes compare their flags, but
        only on `boundary` steps (log/checkpoint steps): the gather waits for every host, which
        would otherwise stall each step. A signal is then acted on at the next boundary.
        """
        if jax.process_count() == 1:
            return self.requested
        if not boundary:
            return False
        return bool(multihost_utils.process_allgather(np.int32(self.requested)).any())

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def check_launch(config: ml_collections.ConfigDict, workdir: Path, restart: bool
                 ) -> workdir_lib.LaunchPlan:
    """Config values and what this launch does with the workdir; writes nothing."""
    config_check.check_config(config, jax.process_count())
    return workdir_lib.check_launch(workdir, config, restart)


def lock_workdir(workdir: Path) -> lock_lib.WorkdirLock:
    """Process 0 locks the workdir for the run; the other processes of a multi-process run
    trust it (they are one run). Every process raises when process 0 could not lock it."""
    lock, error = lock_lib.WorkdirLock(workdir), None
    if jax.process_index() == 0:
        try:
            lock.acquire()
        except ValueError as e:
            error = e
    if jax.process_count() > 1:
        failed = bool(multihost_utils.broadcast_one_to_all(np.int32(error is not None)))
        if failed and error is None:
            error = ValueError(f"--workdir={workdir}: process 0 could not lock it (its log "
                               "says why)")
    if error is not None:
        raise error
    return lock


def check_total_steps(config: ml_collections.ConfigDict, step: int) -> None:
    """A resumed run at or past config.total_steps has nothing to train: below is an error
    (the fix named), equal a warning (a finished run launched again)."""
    if step > config.total_steps:
        raise ValueError(f"config.total_steps={config.total_steps} is below the step this run "
                         f"resumes at ({step}): there is nothing to train. Pass "
                         f"--config.total_steps=N with N > {step} to train on, evaluate or "
                         "export the run as it is, or pass --restart to start over")
    if step == config.total_steps and step > 0:
        logging.warning("The run is already at step %d = config.total_steps: nothing to train "
                        "(pass --config.total_steps=N with N > %d to train on)", step, step)


def build_run(config: ml_collections.ConfigDict) -> tuple[TrainParts, ShardedParts]:
    """The model, optimizer and jitted steps on this run's mesh (errors in the model config
    surface here, before anything is written)."""
    mesh = shard_lib.make_mesh(config.mesh.data, config.mesh.fsdp)
    if config.data.batch_size % mesh.size:
        raise ValueError(f"config.data.batch_size={config.data.batch_size} must be a multiple "
                         f"of the {mesh.size} devices")
    parts = build(config)
    return parts, shard(parts, mesh, config.mesh.fsdp_min_size)


def load_init_weights(config: ml_collections.ConfigDict, parts: TrainParts) -> tuple[Any, Any]:
    """(params, ema_params) as NumPy trees from config.init_from, checked against the model.

    Any source `bsmamba2_jax.loading.read_weights` accepts (a workdir: its best_usdr step, a
    step directory, a model file, ...). Both raw and EMA weights are used where the source has
    both; a source with one kind only starts params and EMA from it. Raises ValueError naming
    the model fields (or the first parameter) that do not fit the config.
    """
    from bsmamba2_jax import loading

    path = config.init_from
    if not Path(path).exists():
        raise ValueError(f"config.init_from={path!r} does not exist; pass a workdir, a "
                         "checkpoint step directory or a model file")
    found, errors = {}, {}
    for weights in ("raw", "ema"):
        try:
            found[weights] = loading.read_weights(path, weights)
        except (FileNotFoundError, ValueError) as e:
            errors[weights] = e
    if not found:
        raise ValueError(f"config.init_from={path!r}: no weights could be read ({errors['ema']})")
    params, saved = found.get("raw", found.get("ema"))
    ema, _ = found.get("ema", found.get("raw"))
    steps = {w: cfg.get("step") for w, (_, cfg) in found.items()}
    if len(set(steps.values())) > 1:
        raise ValueError(f"config.init_from={path!r}: the raw and EMA weights come from "
                         f"different steps {steps} (an unreadable step was skipped for one); "
                         "pass a step directory")
    if len(found) == 1:
        logging.warning("config.init_from=%s holds only %s weights: params and EMA both start "
                        "from them", path, next(iter(found)))
    execution = {f.split(".", 1)[1] for f in config_check.RESUMABLE if f.startswith("model.")}
    mismatch = {k: (v, config.model[k]) for k, v in saved["model"].items()
                if k in config.model and k not in execution
                and (tuple(v) if isinstance(v, list) else v) != config.model[k]}
    if mismatch:
        fields = ", ".join(f"model.{k}={a!r} (weights) vs {b!r} (config)"
                           for k, (a, b) in mismatch.items())
        raise ValueError(f"config.init_from={path!r} holds weights of another model: {fields}; "
                         "set those --config.model fields to the weights' values")
    want = {jax.tree_util.keystr(k): leaf.shape
            for k, leaf in jax.tree_util.tree_leaves_with_path(parts.abstract_state().params)}
    for tree in (params, ema):
        got = {jax.tree_util.keystr(k): np.shape(v)
               for k, v in jax.tree_util.tree_leaves_with_path(tree)}
        for name in sorted(want.keys() | got.keys()):
            if got.get(name) != want.get(name):
                raise ValueError(f"config.init_from={path!r}: parameter {name} is "
                                 f"{got.get(name, 'missing')} there, the model has "
                                 f"{want.get(name, 'no such parameter')}")
    logging.info("Initialising from %s (step %s): %s", path, saved.get("step"),
                 " and ".join(f"{w} weights" for w in found))
    dtypes = parts.abstract_state().params
    return tuple(jax.tree.map(lambda a, w: np.asarray(a, w.dtype), tree, dtypes)
                 for tree in (params, ema))


def prepare_data(config: ml_collections.ConfigDict, workdir: Path
                 ) -> tuple[Any, data_lib.ValidationSet]:
    """This process's training iterator and the validation windows. Process 0 writes the
    synthetic set (if no root is given) while the others wait."""
    if jax.process_index() == 0:
        root = data_lib.prepare_dataset_root(config, workdir)
    _barrier("dataset ready")
    if jax.process_index() != 0:
        root = data_lib.prepare_dataset_root(config, workdir)
    data_iter = iter(data_lib.make_train_dataset(
        config, root, seed=config.seed, shard_index=jax.process_index(),
        shard_count=jax.process_count(), cache_dir=workdir))
    val_set = data_lib.make_validation_set(config, root, seed=config.seed, cache_dir=workdir)
    return data_iter, val_set


def restore_or_init(config: ml_collections.ConfigDict, parts: TrainParts, run: ShardedParts,
                    checkpointer: ckpt_lib.Checkpointer, data_iter: Any,
                    init_weights: tuple[Any, Any] | None) -> TrainState:
    """The newest readable checkpoint; else the init_from weights; else a fresh init."""
    state = checkpointer.restore_latest(run.abstract_state(parts), data_iter)
    if state is not None:
        if config.init_from:
            logging.info("Resuming: config.init_from=%s is ignored (the run's own checkpoint "
                         "holds newer weights)", config.init_from)
        return state
    if init_weights is not None:
        return run.from_params(*init_weights)
    return run.init(jax.random.PRNGKey(config.seed))


def run_validation(config, run: ShardedParts, state: TrainState, step: int,
                   val_set: data_lib.ValidationSet, checkpointer: ckpt_lib.Checkpointer,
                   writer: MetricWriter, examples: Sequence[ExampleWindow] = ()) -> dict:
    """Validates the EMA weights, logs the scores (and the example windows' audio) and keeps the
    step if it ranks among the best."""
    checkpointer.wait()  # a failed save must stop the run before more work is done
    metrics, kept = validate(run.eval_step, state.ema_params, val_set, run.mesh,
                             config.eval_batch_size, keep=[e.index for e in examples])
    entered = checkpointer.save_selected(step, state, metrics)
    if jax.process_index() == 0:
        logging.info("step %d validation (EMA): %s%s", step,
                     {k: round(v, 4) for k, v in metrics.items()},
                     f"; kept in {', '.join(entered)}" if entered else "")
    writer.write(step, metrics, prefix="val/")
    writer.write_examples(step, examples, kept)
    return metrics


def train_loop(config: ml_collections.ConfigDict, workdir: Path, run: ShardedParts,
               state: TrainState, data_iter: Any, val_set: data_lib.ValidationSet,
               checkpointer: ckpt_lib.Checkpointer) -> tuple[TrainState, dict]:
    """Steps to config.total_steps (or a stop signal); returns the state and the last
    validation metrics."""
    step = int(state.step)
    writer = MetricWriter(workdir, tensorboard=config.tensorboard)
    examples = (choose_examples(val_set, config.tensorboard_examples, seed=config.seed)
                if writer.tensorboard else [])
    progress = Progress(step, config.total_steps, config.data.batch_size)
    stop = StopRequest()
    val_metrics: dict = {}
    try:
        while step < config.total_steps:
            local = next(data_iter)
            batch = {k: jax.make_array_from_process_local_data(run.data_sharding,
                                                               np.asarray(local[k]))
                     for k in ("mixture", "vocals")}
            state, metrics = run.train_step(state, batch)
            step += 1
            last = step == config.total_steps
            log_now = step % config.log_every == 0
            ckpt_now = step % config.ckpt_every == 0
            stopping = stop.agreed(boundary=last or log_now or ckpt_now)

            if log_now or last or stopping:
                metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
                if metrics["nonfinite_run"] >= config.max_nonfinite_run:
                    checkpointer.wait()
                    raise FloatingPointError(
                        f"{int(metrics['nonfinite_run'])} micro-batches in a row had a non-finite "
                        f"loss or gradient (step {step}); lower config.optim.lr, use "
                        "config.model.dtype='float32', or resume from an earlier checkpoint")
                line, rate = progress.line(step, {k: metrics[k] for k in ("loss", "grad_norm")})
                if jax.process_index() == 0:
                    logging.info(line)
                writer.write(step, {**metrics, "examples_per_s": rate}, prefix="train/")
            if last or stopping or ckpt_now:
                checkpointer.save(step, state, data_iter, force=True)
            if not stopping and (last or (config.eval_every and step % config.eval_every == 0)):
                val_metrics = run_validation(config, run, state, step, val_set, checkpointer,
                                             writer, examples)
            if stopping:
                logging.warning("Stopped at step %d on request; checkpoint saved", step)
                break
    finally:
        stop.restore()
        writer.close()
    return state, val_metrics


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | Path, *,
                       restart: bool = False) -> dict:
    """Trains (or resumes) to config.total_steps; returns the last validation metrics.

    Everything that can fail on bad input (config values, the workdir's run, the model, the
    init_from weights) is checked before the workdir is written to; the first write takes the
    workdir's lock, which is held until the end.
    """
    workdir = Path(workdir).absolute()
    plan = check_launch(config, workdir, restart)
    parts, run = build_run(config)
    has_checkpoint = plan.resume and ckpt_lib.step_numbers(workdir / ckpt_lib.CHECKPOINTS)
    init_weights = (load_init_weights(config, parts)
                    if config.init_from and not has_checkpoint else None)
    lock = lock_workdir(workdir)
    try:
        if check_launch(config, workdir, restart) != plan:
            raise ValueError(f"--workdir={workdir} changed while this launch was starting "
                             "(another process wrote into it); launch again")
        return _train_locked(config, workdir, plan, parts, run, init_weights)
    finally:
        lock.release()


def _train_locked(config: ml_collections.ConfigDict, workdir: Path,
                  plan: workdir_lib.LaunchPlan, parts: TrainParts, run: ShardedParts,
                  init_weights: tuple[Any, Any] | None) -> dict:
    """The part of `train_and_evaluate` that writes into the workdir, under its lock."""
    data_iter, val_set = prepare_data(config, workdir)
    if plan.restart and jax.process_index() == 0:
        workdir_lib.move_run_aside(workdir)
    _barrier("launch checked")
    if config.compilation_cache:
        jax.config.update("jax_compilation_cache_dir", str(workdir / "jax_cache"))
    checkpointer = ckpt_lib.Checkpointer(workdir, config)
    try:
        state = restore_or_init(config, parts, run, checkpointer, data_iter, init_weights)
        step = int(state.step)
        check_total_steps(config, step)
        if step >= config.total_steps:  # a finished run launched again: nothing to write
            return {}
        if jax.process_index() == 0:
            workdir_lib.record_config(workdir, config, plan, step)
            workdir_lib.drop_metrics_after(workdir, step)
            n_params = sum(x.size for x in jax.tree.leaves(state.params))
            logging.info("%s at step %d: %d params, mesh %s, %d processes",
                         "Resuming" if step else "Starting", step, n_params,
                         dict(run.mesh.shape), jax.process_count())
        _barrier("run recorded")
        state, val_metrics = train_loop(config, workdir, run, state, data_iter, val_set,
                                        checkpointer)
    finally:
        checkpointer.close()  # waits for pending saves and raises if one failed
    if jax.process_count() > 1:  # replicas must agree; compare these lines across processes
        logging.info("process %d params digest %s", jax.process_index(), params_digest(state))
    return val_metrics


def params_digest(state: TrainState) -> str:
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
    try:
        train_and_evaluate(FLAGS.config, FLAGS.workdir, restart=FLAGS.restart)
    except (ValueError, ckpt_lib.CheckpointError) as e:
        # Bad input: one message naming the problem and the fix; the traceback at --verbosity=1.
        logging.debug("Traceback", exc_info=True)
        logging.error("%s", e)
        raise SystemExit(2) from None


if __name__ == "__main__":
    define_flags()
    flags.mark_flags_as_required(["config"])
    app.run(main)
