"""Evaluate a BSMamba2 checkpoint on a split: uSDR, cSDR, leakage, onset table, length sweep.

    python evaluate.py --config=configs/bsmamba2.py --workdir=DIR [--checkpoint=PATH]
        [--split=test] [--segment_seconds=8] [--overlap=0] [--sweep=1,2,4,8,12,16] [--shifts=N]
        [--museval] [--write_audio] [--force] [--batch_size=4] [--max_tracks=0]

The weights are the EMA weights of the latest checkpoint in --workdir, or of --checkpoint (a
workdir, a checkpoint step directory, or a model file written by `python -m bsmamba2_jax.export`).
The architecture comes from the checkpoint; only execution fields (ssd_impl, remat) come from
--config. Data: --config.data.root (MUSDB18-HQ), or when empty the synthetic set of the workdir.
Results go to DIR/eval/<split>/seg<S>_ov<O>_shifts<N>/ (see bsmamba2_jax/evaluation.py); a
track already scored there is skipped unless --force.
"""

from __future__ import annotations

from absl import app, flags
from ml_collections import config_flags

from bsmamba2_jax import evaluation

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file (configs/bsmamba2.py[:variant]).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Training workdir; results go to WORKDIR/eval/.")
flags.DEFINE_string("checkpoint", None, "Workdir, checkpoint step dir, or exported model file "
                    "(default: the latest checkpoint of --workdir).")
flags.DEFINE_enum("split", "test", ["train", "valid", "test"], "Dataset split to evaluate.")
flags.DEFINE_float("segment_seconds", 8.0, "Inference segment length (paper: 8 s).")
flags.DEFINE_float("overlap", 0.0, "Segment overlap fraction in [0, 1) (paper: 0).")
flags.DEFINE_list("sweep", [], "Segment lengths in seconds for Table IV, e.g. 1,2,4,8,12,16.")
flags.DEFINE_integer("shifts", 1, "Shift test-time averaging copies (1 = off).")
flags.DEFINE_integer("batch_size", 4, "Segments per model call.")
flags.DEFINE_integer("max_tracks", 0, "Evaluate only the first N tracks (0 = all).")
flags.DEFINE_bool("museval", False, "Also run full museval (SDR/ISR/SIR/SAR) and store its JSON.")
flags.DEFINE_bool("write_audio", False, "Write vocals/accompaniment estimates as wav.")
flags.DEFINE_bool("force", False, "Re-score tracks that already have results.")
flags.DEFINE_bool("progress", True, "Show a progress bar over tracks.")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if FLAGS.config is None:
        raise app.UsageError("--config is required, e.g. --config=configs/bsmamba2.py")
    if FLAGS.workdir is None:
        raise app.UsageError("--workdir is required (the training workdir; results go there)")
    try:
        sweep = [float(s) for s in FLAGS.sweep]
    except ValueError as e:
        raise app.UsageError(f"--sweep must be seconds separated by commas: {e}") from e
    evaluation.run(FLAGS.config, FLAGS.workdir, checkpoint=FLAGS.checkpoint, split=FLAGS.split,
        segment_seconds=FLAGS.segment_seconds, overlap=FLAGS.overlap, sweep=sweep,
        shifts=FLAGS.shifts, batch_size=FLAGS.batch_size, max_tracks=FLAGS.max_tracks,
        run_museval=FLAGS.museval, write_audio=FLAGS.write_audio, force=FLAGS.force,
        progress=FLAGS.progress)


if __name__ == "__main__":
    app.run(main)
