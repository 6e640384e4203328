"""Scoring separated tracks: the scores of one track, and the loop over a split with its files.

The model enters only as a `VocalsFn`, mixture (2, n) float32 -> vocal estimate (2, n), so
everything here runs with stand-ins; `make_vocals_fn` builds one from a model and its params.
The run over checkpoints and segment lengths is evaluate.py's; tables are `bsmamba2_jax.reports`,
files `bsmamba2_jax.eval_io`.

The paper's scores (the authors' `src/evaluate.py` and `src/utils/utils_test.py`; see
docs/DESIGN.md#evaluation): per track, uSDR of the vocals and cSDR = nanmedian over 1 s frames of
museval's SDR with the vocals scored alone; over tracks, the mean uSDR and the median cSDR. The
accompaniment (mixture - estimate against the sum of the other stems) is scored alone as well and
kept in its own columns.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bsmamba2_jax import eval_io, metrics, reports
from bsmamba2_jax import excerpts as excerpts_lib
from bsmamba2_jax.data.musdb import SAMPLE_RATE

# Bumped whenever a stored score would change meaning: results of another version are rescored.
# 2: cSDR of the vocals alone (was vocals and accompaniment jointly, as museval.evaluate does).
# 3: results carry the reference checks (silent references, mixture vs the sum of its stems).
SCORING_VERSION = 3

VocalsFn = Callable[[np.ndarray], np.ndarray]


def make_vocals_fn(model: Any, params: Any, *, segment_seconds: float = 8.0,
                   overlap: float = 0.0, batch_size: int = 4, shifts: int = 1,
                   rate: int = SAMPLE_RATE) -> VocalsFn:
    """A `VocalsFn` around `bsmamba2_jax.inference.separate_vocals`.

    shifts > 1: test-time averaging over `shifts` copies of the input delayed by k/shifts of a
    segment (k = 0..shifts-1, zeros in front), so segment boundaries fall at different places;
    each output is moved back and the copies are averaged. Deterministic.
    """
    if shifts < 1:
        raise ValueError(f"shifts={shifts} must be >= 1 (1 = no shift averaging)")
    from bsmamba2_jax.inference import separate_vocals

    segment = int(round(segment_seconds * rate))

    def run(mixture: np.ndarray) -> np.ndarray:
        return np.asarray(separate_vocals(model, params, mixture, segment_seconds=segment_seconds,
                                   overlap=overlap, batch_size=batch_size, sample_rate=rate),
                          dtype=np.float32)

    def vocals_fn(mixture: np.ndarray) -> np.ndarray:
        mixture = np.asarray(mixture, dtype=np.float32)
        if shifts == 1:
            return run(mixture)
        n = mixture.shape[-1]
        total = np.zeros(mixture.shape, np.float64)
        for k in range(shifts):
            offset = k * segment // shifts
            shifted = np.pad(mixture, ((0, 0), (offset, 0)))
            total += run(shifted)[:, offset:offset + n]
        return (total / shifts).astype(np.float32)

    return vocals_fn


# ----------------------------------------------------------------------------- scores of a track


def onset_stretch_scores(vocals: np.ndarray, estimate: np.ndarray, rate: int = SAMPLE_RATE,
                         bins: Sequence[tuple[float, float]] = reports.ONSET_BINS) -> list[dict]:
    """uSDR of each vocal-active stretch whose length falls in one of `bins` (Table III).

    Stretches come from `metrics.active_stretches` on the reference vocals; a stretch of length d
    belongs to the bin with lo <= d < hi (the last bin includes hi).
    Returns: [{"start": s, "stop": s, "seconds": d, "bin": "1-2s", "usdr": dB}, ...].
    """
    out = []
    for a, b in metrics.active_stretches(vocals, rate):
        d = (b - a) / rate
        for i, (lo, hi) in enumerate(bins):
            if lo <= d < hi or (i == len(bins) - 1 and d == hi):
                out.append({"start": a / rate, "stop": b / rate, "seconds": d,
                            "bin": reports.bin_label(lo, hi),
                            "usdr": metrics.usdr(vocals[:, a:b], estimate[:, a:b])})
                break
    return out


def score_track(mixture: np.ndarray, vocals: np.ndarray, accompaniment: np.ndarray,
                estimate: np.ndarray, rate: int = SAMPLE_RATE) -> dict[str, Any]:
    """Every score of one track.

    Args:
      mixture, vocals, accompaniment, estimate: (2, samples); estimate = estimated vocals, the
        estimated accompaniment is mixture - estimate.
    Returns:
      dict with usdr and csdr of the vocals (the paper's: museval frames of the vocals alone,
      nanmedian), usdr_accompaniment and csdr_accompaniment (the accompaniment alone),
      leakage_db (silent-region leakage), silent_seconds, seconds, csdr_frames (list, None = NaN),
      onset (per-stretch uSDRs), and vocals_silent / accompaniment_silent: the reference is
      silent in every 1 s frame (`metrics.reference_silent`), so its scores are left out of the
      aggregates (`reports.summarize`). Undefined scores are None, infinite ones "inf"/"-inf".
    """
    if estimate.shape != vocals.shape:
        raise ValueError(f"estimate {estimate.shape} must match the reference {vocals.shape}")
    usdr, frames = metrics.sdr_scores(vocals, estimate, rate)
    usdr_acc, frames_acc = metrics.sdr_scores(accompaniment, mixture - estimate, rate)
    leakage, silent = metrics.silent_leakage(vocals, estimate, mixture, rate)
    return {
        "usdr": usdr,
        "csdr": _json_float(metrics.nanmedian(frames)),  # None when the vocals are all silent
        "usdr_accompaniment": usdr_acc,
        "csdr_accompaniment": _json_float(metrics.nanmedian(frames_acc)),
        "leakage_db": _json_float(leakage),  # None without vocal-silent frames
        "silent_seconds": silent * 1.0,
        "seconds": vocals.shape[-1] / rate,
        "csdr_frames": [_json_float(v) for v in frames],
        "onset": onset_stretch_scores(vocals, estimate, rate),
        "vocals_silent": metrics.reference_silent(vocals, rate),
        "accompaniment_silent": metrics.reference_silent(accompaniment, rate),
    }


def museval_scores(mixture: np.ndarray, vocals: np.ndarray, accompaniment: np.ndarray,
                   estimate: np.ndarray, rate: int = SAMPLE_RATE) -> dict[str, Any]:
    """Full museval v4 (SDR, ISR, SIR, SAR per 1 s frame), vocals and accompaniment each alone.

    Each target is `museval.metrics.bss_eval` of that one source, as the authors score the vocals
    (so there is no interference: SIR is "inf"); a target that museval refuses (silent over the
    whole track) gets {"error": message}.
    """
    from museval.metrics import bss_eval

    out: dict[str, Any] = {}
    names = ("SDR", "ISR", "SIR", "SAR")
    for target, ref, est in (("vocals", vocals, estimate),
                             ("accompaniment", accompaniment, mixture - estimate)):
        try:
            values = bss_eval(ref.T[None].astype(np.float64), est.T[None].astype(np.float64),
                              window=rate, hop=rate)[:4]
        except ValueError as e:  # museval refuses a source that is silent over the whole track
            out[target] = {"error": str(e)}
            continue
        out[target] = {name: [_json_float(v) for v in v_[0]]
                       for name, v_ in zip(names, values, strict=True)}
        out[target]["median"] = {name: _json_float(metrics.nanmedian(v_[0]))
                                 for name, v_ in zip(names, values, strict=True)}
    return out


def _json_float(x: Any) -> float | str | None:
    """A score for strict JSON: NaN (undefined) -> None, +-inf (exact) -> "inf" / "-inf"."""
    x = float(x)
    if math.isnan(x):
        return None
    return x if math.isfinite(x) else ("inf" if x > 0 else "-inf")


# ----------------------------------------------------------------------------- a split


def evaluate_tracks(vocals_fn: VocalsFn, tracks: Iterable[Any], out_dir: str | Path, *,
                    producer: Mapping[str, Any] | None = None, force: bool = False,
                    save_audio: bool = False, run_museval: bool = False,
                    rate: int = SAMPLE_RATE, compute_dtype: str | None = None,
                    desc: str = "tracks", progress: bool = True,
                    excerpts: int = 0) -> list[dict]:
    """Separates and scores every track; reuses stored results of the same producer.

    Args:
      vocals_fn: the model under test.
      tracks: `bsmamba2_jax.data.Track`s or track folders.
      out_dir: the run's folder (see bsmamba2_jax.eval_io).
      producer: what makes these results, stored in every per-track file: {"model": identity from
        `eval_io.model_identity`, "settings": segment length, overlap, shifts, ...}. A stored
        result is reused only when its producer equals this one (and the scoring version).
      force: score every track again.
      save_audio, run_museval: also write the estimates / full museval scores (a stored result
        without them is scored again).
      compute_dtype: the model's compute dtype, named in the error for a non-finite estimate.
      excerpts: keep this many clips of each track's estimate for the HTML report
        (`bsmamba2_jax.excerpts.save`, in excerpts/<name>/); a stored result without them is
        scored again.
    Returns:
      the per-track result dicts (with "name"), in track order: `score_track`'s scores plus
      mixture_residual_db (`eval_io.mixture_residual_db`; None without the other stems) and
      mixture_mismatch (above `eval_io.MIXTURE_TOLERANCE_DB`). Writes tracks/<name>.json as soon
      as a track is scored (an interrupted run resumes), then the reports.
    Raises:
      ValueError naming the file or the track, before the model runs on it, for a truncated file
      or one with NaN/Inf samples (`eval_io.read_audio`); after, when an estimate has the wrong
      shape or non-finite samples (a NaN would silently drop frames from the cSDR median).
    """
    from tqdm import tqdm

    out_dir = Path(out_dir)
    tracks = list(tracks)
    if not tracks:
        raise ValueError("No tracks to evaluate: check the dataset root and the split")
    producer = {**(producer or {}), "scoring_version": SCORING_VERSION}
    results = []
    bar = tqdm(tracks, desc=desc, unit="track", disable=not progress, dynamic_ncols=True)
    for track in bar:
        name = eval_io.track_name(track)
        path = out_dir / "tracks" / f"{name}.json"
        museval_path = out_dir / "tracks" / f"{name}.museval.json"
        audio_dir = out_dir / "audio" / name
        excerpt_dir = out_dir / "excerpts" / name
        stored = None if force else eval_io.read_result(path, producer)
        if (stored is not None and (not run_museval or museval_path.is_file())
                and (not save_audio or (audio_dir / "vocals.wav").is_file())
                and (not excerpts or excerpts_lib.load(excerpt_dir, excerpts) is not None)):
            results.append(stored)
            continue
        if path.is_file() and not force:
            logging.info("%s: stored result made by another model or setting; scoring again",
                         path)
        audio = eval_io.load_track(track, rate)
        estimate = np.asarray(vocals_fn(audio["mixture"]), dtype=np.float32)
        check_estimate(estimate, audio["mixture"], name, compute_dtype)
        result = {"name": name, **score_track(audio["mixture"], audio["vocals"],
                                              audio["accompaniment"], estimate, rate)}
        result.update(mixture_check(track, audio))
        if result["mixture_mismatch"]:
            logging.warning("%s: mixture.wav is not the sum of its stems (residual %.1f dB "
                            "relative to the mixture)", name,
                            reports.from_json(result["mixture_residual_db"]))
        if result["vocals_silent"]:
            logging.warning("%s: the reference vocals are silent; uSDR and cSDR leave the "
                            "track out", name)
        if run_museval:
            full = museval_scores(audio["mixture"], audio["vocals"], audio["accompaniment"],
                                  estimate, rate)
            eval_io.write_json(museval_path, full)
            if "median" in full["vocals"]:
                result.update({f"museval_{k.lower()}": v
                               for k, v in full["vocals"]["median"].items()})
        if save_audio:
            eval_io.write_audio(audio_dir / "vocals.wav", estimate, rate)
            eval_io.write_audio(audio_dir / "accompaniment.wav", audio["mixture"] - estimate,
                                rate)
        if excerpts:
            excerpts_lib.save(excerpt_dir, audio["vocals"], estimate, rate, excerpts)
        result["producer"] = json.loads(json.dumps(producer))
        eval_io.write_json(path, result)
        results.append(result)
        bar.set_postfix(usdr=f"{result['usdr']:.2f}",
                        csdr=f"{reports.from_json(result['csdr']):.2f}")
    reports.write_run_reports(results, out_dir, model=(producer.get("model")))
    return results


def mixture_check(track: Any, audio: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """{"mixture_residual_db", "mixture_mismatch"} of a track loaded by `eval_io.load_track`.

    mixture_residual_db: `eval_io.mixture_residual_db`, None when the track has no other stems
    (its accompaniment is then mixture - vocals, so there is nothing to compare).
    mixture_mismatch: the residual is above `eval_io.MIXTURE_TOLERANCE_DB`.
    """
    if eval_io.accompaniment_paths(track) is None:
        return {"mixture_residual_db": None, "mixture_mismatch": False}
    residual = eval_io.mixture_residual_db(audio["mixture"], audio["vocals"],
                                           audio["accompaniment"])
    return {"mixture_residual_db": _json_float(residual),
            "mixture_mismatch": bool(residual > eval_io.MIXTURE_TOLERANCE_DB)}


def check_estimate(estimate: np.ndarray, mixture: np.ndarray, name: str,
                   compute_dtype: str | None = None) -> None:
    """A named error for an estimate of the wrong shape or with NaN/Inf samples.

    The mixture was checked finite when read, so NaN/Inf came from the model: float16 compute
    overflows easily; in another dtype the weights themselves are the suspect.
    """
    if estimate.shape != mixture.shape:
        raise ValueError(f"{name}: the model returned {estimate.shape} for a mixture of shape "
                         f"{mixture.shape}; it must return the same shape")
    bad = int(np.size(estimate) - np.count_nonzero(np.isfinite(estimate)))
    if not bad:
        return
    if compute_dtype == "float16":
        cause = ("float16 compute overflowed: evaluate with --dtype=float32 or --dtype=bfloat16")
    else:
        where = f" in {compute_dtype} compute" if compute_dtype else ""
        cause = (f"the model made them from a finite mixture{where}: its weights may hold "
                 "NaN/Inf or come from a diverged run; check the checkpoint (its validation "
                 "records in metrics.jsonl) or score another --checkpoint")
    raise ValueError(f"{name}: the vocal estimate has {bad} non-finite samples (NaN/Inf), which "
                     f"would drop frames from the cSDR silently; {cause}")
