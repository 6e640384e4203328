"""A synthetic, MUSDB18-HQ-shaped dataset: the demo's and the tests' data.

    python -m bsmamba2_jax.data.synthetic OUT --tracks N --seconds S [--seed 0]

writes `OUT/{train,test}/<track>/{mixture,vocals,drums,bass,other}.wav` (44.1 kHz, stereo, float32
or PCM_16) and `OUT/musdb_setup.yaml`. Every file is a pure function of (seed, subset, track index,
seconds): regenerating gives bit-identical files.

Track names and the split rule. `--tracks N` tracks go to `OUT/train` and `--test-tracks` to
`OUT/test`, as in MUSDB18-HQ. Of the N train-folder tracks, the last `--valid-tracks` are the
validation split and are named `Synthetic - Valid 000`, ... (the others `Synthetic - Train 000`,
..., test ones `Synthetic - Test 000`, ...). musdb's built-in `validation_tracks` names real
MUSDB18 songs, so the generator writes a musdb setup file `OUT/musdb_setup.yaml` (musdb's own
format; JSON is valid YAML) whose `validation_tracks` lists the synthetic validation names.
`list_tracks` passes that file to `musdb.DB(setup_file=...)` whenever a root has one; a real
MUSDB18-HQ root has none and gets musdb's standard 86 / 14 / 50 split.

The stems:
  - vocals: sparse phrases of sung notes (harmonic tones with vibrato, amplitudes shaped by vowel
    formants, soft attack/release) separated by silent stretches of exact zeros, some of them
    several seconds long; the sparsity is the point of the paper.
  - drums: kick (falling sine), snare (noise + tone) and hi-hat (differenced noise) on a 16th grid.
  - bass: plucked harmonic notes on the chord roots, one or two beats each.
  - other: sustained sawtooth-like chord pads, slightly detuned between channels, in the same
    register as the vocals so that separating them takes more than a frequency split.
mixture = vocals + drums + bass + other, in that order, in float32 (for PCM_16 the stems are
quantised first, so the 16-bit mixture is still exactly their sum).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import shutil
import tempfile
from collections.abc import Sequence

import numpy as np

# One definition of the rate, the stems and the musdb setup file name (the file the generator
# writes with the synthetic validation track names).
from bsmamba2_jax.data.musdb import SAMPLE_RATE, SETUP_FILE, STEMS

INFO_FILE = "synthetic.json"  # generation parameters; written last, marks a complete set
SUBTYPES = ("FLOAT", "PCM_16")

# Vowel formants (Hz) and relative gains: a, e, i, o, u (textbook adult averages).
_FORMANTS = np.array([[800, 1200, 2500], [400, 2000, 2600], [300, 2300, 3000],
                      [450, 800, 2600], [325, 700, 2500]], np.float64)
_FORMANT_GAINS = np.array([1.0, 0.5, 0.25])
_FORMANT_WIDTHS = np.array([150.0, 200.0, 250.0])  # Gaussian std-devs in Hz
_MAJOR = np.array([0, 2, 4, 5, 7, 9, 11])
_MINOR = np.array([0, 2, 3, 5, 7, 8, 10])


@dataclasses.dataclass(frozen=True)
class SyntheticTrack:
    """One generated track.

    stems: name -> (2, samples) float32. vocal_phrases: (start, stop) sample ranges where the
    vocals may be non-zero; outside them the vocals are exactly 0.
    """

    stems: dict[str, np.ndarray]
    vocal_phrases: tuple[tuple[int, int], ...]


def track_names(tracks: int, valid_tracks: int, test_tracks: int) -> dict[str, list[str]]:
    """Folder names per split: {"train": [...], "valid": [...], "test": [...]}."""
    train_only = tracks - valid_tracks
    return {"train": [f"Synthetic - Train {i:03d}" for i in range(train_only)],
            "valid": [f"Synthetic - Valid {i:03d}" for i in range(valid_tracks)],
            "test": [f"Synthetic - Test {i:03d}" for i in range(test_tracks)]}


def _pan(mono: np.ndarray, pan: float) -> np.ndarray:
    """Constant-power pan of (n,) to (2, n); pan in [-1, 1], -1 = left."""
    angle = (pan + 1.0) * np.pi / 4.0
    return np.stack([np.cos(angle) * mono, np.sin(angle) * mono])


def _fade(n: int, attack: int, release: int) -> np.ndarray:
    """(n,) raised-cosine attack and release envelope (no clicks at note edges)."""
    env = np.ones(n)
    a, r = min(attack, n // 2), min(release, n // 2)
    if a:
        env[:a] = 0.5 - 0.5 * np.cos(np.pi * np.arange(a) / a)
    if r:
        env[n - r:] = 0.5 + 0.5 * np.cos(np.pi * (np.arange(r) + 1) / r)
    return env


def _midi_hz(midi: float | np.ndarray) -> float | np.ndarray:
    return 440.0 * 2.0 ** ((np.asarray(midi) - 69.0) / 12.0)


def _sung_note(rng: np.random.Generator, n: int, midi: float) -> np.ndarray:
    """(n,) one sung note: vibrato, formant-weighted harmonics, soft edges."""
    t = np.arange(n) / SAMPLE_RATE
    rate, depth = rng.uniform(4.5, 6.5), rng.uniform(0.2, 0.6)  # Hz, semitones
    onset = np.clip(t / 0.15, 0.0, 1.0)  # vibrato sets in after ~150 ms, as singers do
    f0 = _midi_hz(midi) * 2.0 ** (depth / 12.0 * onset * np.sin(2 * np.pi * rate * t
                                                                + rng.uniform(0, 2 * np.pi)))
    phase = 2 * np.pi * np.cumsum(f0) / SAMPLE_RATE
    vowel = _FORMANTS[rng.integers(len(_FORMANTS))]
    f0_mean = float(_midi_hz(midi))
    harmonics = np.arange(1, int(min(30, 9000.0 // f0_mean)) + 1)
    freqs = harmonics[:, None] * f0_mean
    envelope = (_FORMANT_GAINS[None] * np.exp(
        -0.5 * ((freqs - vowel[None]) / _FORMANT_WIDTHS[None]) ** 2)).sum(-1) + 0.03
    wave = _harmonic_sum(phase, envelope / harmonics ** 0.7)
    return wave * _fade(n, int(0.03 * SAMPLE_RATE), int(0.06 * SAMPLE_RATE))


def _vocals(rng: np.random.Generator, n: int, root: int, scale: np.ndarray
            ) -> tuple[np.ndarray, tuple[tuple[int, int], ...]]:
    """(2, n) sparse vocals and their phrase ranges."""
    out = np.zeros(n)
    phrases = []
    pos = int(rng.uniform(0.0, 2.5) * SAMPLE_RATE)
    pitches = root + 12 + np.concatenate([scale, scale + 12, scale + 24])  # ~E3..B5
    while pos < n:
        length = int(rng.uniform(1.5, 5.0) * SAMPLE_RATE)
        stop = min(pos + length, n)
        cursor = pos
        degree = rng.integers(3, 10)
        while cursor < stop - int(0.1 * SAMPLE_RATE):
            note = min(int(rng.uniform(0.15, 0.6) * SAMPLE_RATE), stop - cursor)
            degree = int(np.clip(degree + rng.integers(-2, 3), 0, len(pitches) - 1))
            out[cursor:cursor + note] += _sung_note(rng, note, float(pitches[degree]))
            cursor += note + int(rng.uniform(0.0, 0.08) * SAMPLE_RATE)  # legato, short breaths
        phrases.append((pos, stop))
        # Mostly short gaps, sometimes long silent stretches (whole segments without vocals).
        gap = rng.uniform(4.0, 9.0) if rng.random() < 0.35 else rng.uniform(0.5, 3.0)
        pos = stop + int(gap * SAMPLE_RATE)
    return _pan(out, rng.uniform(-0.2, 0.2)), tuple(phrases)


def _add(out: np.ndarray, start: int, sound: np.ndarray) -> None:
    """out[..., start:] += sound, clipped at the end of out."""
    stop = min(start + sound.shape[-1], out.shape[-1])
    if stop > start:
        out[..., start:stop] += sound[..., :stop - start]


def _drums(rng: np.random.Generator, n: int, beat: int) -> np.ndarray:
    """(2, n) a drum loop with a random 16-step pattern per bar."""
    out = np.zeros((2, n))
    step = beat // 4
    t_kick = np.arange(int(0.35 * SAMPLE_RATE)) / SAMPLE_RATE
    kick = np.sin(2 * np.pi * np.cumsum(50 + 100 * np.exp(-t_kick / 0.03)) / SAMPLE_RATE)
    kick *= np.exp(-t_kick / 0.15)
    t_snare = np.arange(int(0.25 * SAMPLE_RATE)) / SAMPLE_RATE
    t_hat = np.arange(int(0.08 * SAMPLE_RATE)) / SAMPLE_RATE
    for bar_start in range(0, n, 16 * step):
        kicks = {0, 8} | {s for s in range(16) if s % 2 == 0 and rng.random() < 0.15}
        for s in range(16):
            pos = bar_start + s * step
            if s in kicks:
                _add(out, pos, _pan(kick, 0.0))
            if s in (4, 12):
                snare = (rng.standard_normal(len(t_snare)) * np.exp(-t_snare / 0.08) * 0.6
                         + np.sin(2 * np.pi * 190 * t_snare) * np.exp(-t_snare / 0.05))
                _add(out, pos, _pan(snare, -0.15))
            if s % 2 == 0 and rng.random() < 0.9:
                hat = np.diff(rng.standard_normal(len(t_hat) + 1)) * np.exp(-t_hat / 0.02) * 0.3
                _add(out, pos, _pan(hat, 0.4))
    return out


def _harmonic_sum(phase: np.ndarray, amps: np.ndarray) -> np.ndarray:
    """sum_k amps[k-1] * sin(k * phase): (n,). Uses sin(k p) = 2 cos(p) sin((k-1) p) - sin((k-2) p),
    one multiply-add per harmonic instead of a sin (generation is dominated by this)."""
    two_cos = 2.0 * np.cos(phase)
    prev, cur = np.zeros_like(phase), np.sin(phase)
    out = amps[0] * cur
    for a in amps[1:]:
        prev, cur = cur, two_cos * cur - prev
        out += a * cur
    return out


def _harmonic_tone(n: int, hz: float, harmonics: int, power: float, detune: float = 0.0,
                   phase: float = 0.0) -> np.ndarray:
    """(n,) sum_k sin(k (2 pi f t + phase)) / k**power."""
    f = hz * 2.0 ** (detune / 1200.0)
    p = 2 * np.pi * f * np.arange(n) / SAMPLE_RATE + phase
    return _harmonic_sum(p, 1.0 / np.arange(1, harmonics + 1) ** power)


def _bass(rng: np.random.Generator, n: int, beat: int, chord_roots: Sequence[int]) -> np.ndarray:
    """(2, n) plucked bass notes on the chord roots, one chord per bar."""
    out = np.zeros(n)
    pos = 0
    while pos < n:
        root = chord_roots[(pos // (4 * beat)) % len(chord_roots)]
        length = beat * int(rng.integers(1, 3))
        hz = float(_midi_hz(root + rng.choice([0, 0, 0, 12, 7])))
        note = _harmonic_tone(length, hz, 6, 2.0)
        note *= np.exp(-np.arange(length) / (0.4 * SAMPLE_RATE))
        _add(out, pos, note * _fade(length, int(0.005 * SAMPLE_RATE), int(0.02 * SAMPLE_RATE)))
        pos += length
    return _pan(out, 0.0)


def _other(rng: np.random.Generator, n: int, beat: int, root: int, scale: np.ndarray,
           degrees: Sequence[int]) -> np.ndarray:
    """(2, n) sustained triad pads on the scale degrees, one chord per bar, detuned L/R."""
    out = np.zeros((2, n))
    bar = 4 * beat
    for i, pos in enumerate(range(0, n, bar)):
        d = int(degrees[i % len(degrees)])
        notes = [root + 12 + int(scale[(d + j) % 7]) + 12 * ((d + j) // 7) for j in (0, 2, 4)]
        length = min(bar, n - pos)
        env = _fade(length, int(0.2 * SAMPLE_RATE), int(0.2 * SAMPLE_RATE))
        for note in notes:
            hz = float(_midi_hz(note))
            for ch, cents in enumerate((-4.0, 4.0)):
                out[ch, pos:pos + length] += env * _harmonic_tone(
                    length, hz, 8, 1.0, cents, rng.uniform(0, 2 * np.pi)) / 3.0
    return out


def _scale_rms(x: np.ndarray, rms: float, mask: np.ndarray | None = None) -> np.ndarray:
    region = x if mask is None else x[:, mask]
    current = np.sqrt(np.mean(region ** 2)) if region.size else 0.0
    return x * (rms / current) if current > 0 else x


def synthesize_track(seed: int, subset: str, index: int, seconds: float) -> SyntheticTrack:
    """Generates one track; a pure function of its arguments.

    Args:
      seed: dataset seed. subset: "train" or "test" (the folder). index: the track's position in
        that folder's generation order. seconds: duration.
    Returns:
      SyntheticTrack with stems of shape (2, round(seconds * 44100)) float32, already scaled so
      the mixture peaks below 0.99.
    """
    if subset not in ("train", "test"):
        raise ValueError(f"subset={subset!r} must be 'train' or 'test'")
    n = int(round(seconds * SAMPLE_RATE))
    if n <= 0:
        raise ValueError(f"seconds={seconds} must be positive")
    rng = np.random.default_rng([seed, 0 if subset == "train" else 1, index])
    beat = int(60.0 / rng.uniform(80, 140) * SAMPLE_RATE)
    root = int(rng.integers(40, 48))  # E2..B2
    scale = _MAJOR if rng.random() < 0.5 else _MINOR
    degrees = rng.choice([[0, 5, 3, 4], [0, 3, 4, 4], [0, 5, 1, 4], [0, 4, 5, 3]])
    chord_roots = [root - 12 + int(scale[d]) for d in degrees]  # bass register, E1..A2
    vocals, phrases = _vocals(rng, n, root, scale)
    active = np.zeros(n, bool)
    for a, b in phrases:
        active[a:b] = True
    stems = {
        "vocals": _scale_rms(vocals, 0.14 * rng.uniform(0.7, 1.3), active),
        "drums": _scale_rms(_drums(rng, n, beat), 0.10 * rng.uniform(0.7, 1.3)),
        "bass": _scale_rms(_bass(rng, n, beat, chord_roots), 0.08 * rng.uniform(0.7, 1.3)),
        "other": _scale_rms(_other(rng, n, beat, root, scale, degrees),
                            0.06 * rng.uniform(0.7, 1.3)),
    }
    peak = np.max(np.abs(sum(stems.values())))
    gain = min(1.0, 0.98 / peak) if peak > 0 else 1.0  # room for PCM_16 without clipping
    return SyntheticTrack({k: (v * gain).astype(np.float32) for k, v in stems.items()},
                          tuple(phrases))


def _quantize_pcm16(x: np.ndarray) -> np.ndarray:
    return (np.clip(np.round(x * 32768.0), -32768, 32767) / 32768.0).astype(np.float32)


def write_track(folder: pathlib.Path, track: SyntheticTrack, subtype: str) -> None:
    """Writes the four stems and their sum as `folder/{mixture,vocals,...}.wav`."""
    import soundfile as sf

    folder.mkdir(parents=True, exist_ok=True)
    stems = track.stems
    if subtype == "PCM_16":
        stems = {k: _quantize_pcm16(v) for k, v in stems.items()}
    mixture = np.zeros_like(stems["vocals"])
    for name in STEMS:  # fixed order: float32 sums are order-dependent
        mixture = mixture + stems[name]
        sf.write(folder / f"{name}.wav", stems[name].T, SAMPLE_RATE, subtype=subtype)
    sf.write(folder / "mixture.wav", mixture.T, SAMPLE_RATE, subtype=subtype)


def musdb_setup(valid_names: Sequence[str]) -> dict:
    """A musdb setup file's content (the keys musdb reads) with our validation tracks."""
    return {
        "sample_rate": float(SAMPLE_RATE),
        "sources": {name: f"{name}.wav" for name in STEMS},
        "mixture": "mixture.wav",
        "stem_ids": {"mixture": 0, "drums": 1, "bass": 2, "other": 3, "vocals": 4},
        "targets": {"vocals": {"vocals": 1}, "drums": {"drums": 1}, "bass": {"bass": 1},
                    "other": {"other": 1},
                    "accompaniment": {"bass": 1, "drums": 1, "other": 1},
                    "linear_mixture": {"vocals": 1, "bass": 1, "drums": 1, "other": 1}},
        "validation_tracks": list(valid_names),
    }


def generation_info(*, tracks: int, valid_tracks: int, test_tracks: int, seconds: float,
                    seed: int, subtype: str) -> dict:
    """The parameters that determine a synthetic set (stored in `INFO_FILE`)."""
    return {"tracks": tracks, "valid_tracks": valid_tracks, "test_tracks": test_tracks,
            "seconds": float(seconds), "seed": seed, "subtype": subtype, "version": 1}


def generate_dataset(out: str | os.PathLike, *, tracks: int, seconds: float,
                     valid_tracks: int | None = None, test_tracks: int | None = None,
                     seed: int = 0, subtype: str = "FLOAT") -> pathlib.Path:
    """Writes a synthetic MUSDB18-HQ-shaped dataset to `out` (which must not exist yet).

    Args:
      out: the new root folder.
      tracks: tracks in `out/train`, validation ones included.
      seconds: duration of every track.
      valid_tracks: how many of them form the validation split (default 14% of `tracks` as in
        MUSDB18-HQ, at least 1).
      test_tracks: tracks in `out/test` (default tracks // 2, at least 1).
      seed: the dataset seed.
      subtype: "FLOAT" (float32 wavs) or "PCM_16".
    Returns:
      The root path. Files are written to a temporary sibling folder that is renamed at the end,
      so a crash never leaves a half-written root behind.
    """
    out = pathlib.Path(out)
    valid_tracks = max(1, round(0.14 * tracks)) if valid_tracks is None else valid_tracks
    test_tracks = max(1, tracks // 2) if test_tracks is None else test_tracks
    if not tracks - valid_tracks >= 1 or valid_tracks < 1 or test_tracks < 1:
        raise ValueError(f"need tracks > valid_tracks >= 1 and test_tracks >= 1, got {tracks=}, "
                         f"{valid_tracks=}, {test_tracks=}")
    if subtype not in SUBTYPES:
        raise ValueError(f"Unknown subtype {subtype!r}; choose one of {SUBTYPES}")
    if out.exists():
        raise ValueError(f"{out} already exists; choose a new folder or delete it")
    names = track_names(tracks, valid_tracks, test_tracks)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        # Generation order inside each folder fixes the per-track seeds.
        for i, name in enumerate(names["train"] + names["valid"]):
            write_track(tmp / "train" / name, synthesize_track(seed, "train", i, seconds), subtype)
        for i, name in enumerate(names["test"]):
            write_track(tmp / "test" / name, synthesize_track(seed, "test", i, seconds), subtype)
        (tmp / SETUP_FILE).write_text(json.dumps(musdb_setup(names["valid"]), indent=1) + "\n")
        info = generation_info(tracks=tracks, valid_tracks=valid_tracks, test_tracks=test_tracks,
                               seconds=seconds, seed=seed, subtype=subtype)
        (tmp / INFO_FILE).write_text(json.dumps(info, indent=1) + "\n")
        os.replace(tmp, out)  # atomic on one filesystem; fails if `out` appeared meanwhile
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bsmamba2_jax.data.synthetic",
        description="Write a synthetic MUSDB18-HQ-shaped dataset (see the module docstring).")
    parser.add_argument("out", help="new root folder")
    parser.add_argument("--tracks", type=int, default=16,
                        help="tracks in OUT/train, validation ones included (default 16)")
    parser.add_argument("--seconds", type=float, default=30.0, help="track length (default 30)")
    parser.add_argument("--valid-tracks", type=int, default=None,
                        help="validation tracks among --tracks (default 14%%, at least 1)")
    parser.add_argument("--test-tracks", type=int, default=None,
                        help="tracks in OUT/test (default tracks // 2)")
    parser.add_argument("--seed", type=int, default=0, help="dataset seed (default 0)")
    parser.add_argument("--subtype", choices=SUBTYPES, default="FLOAT",
                        help="wav sample format (default FLOAT)")
    args = parser.parse_args(argv)
    root = generate_dataset(args.out, tracks=args.tracks, seconds=args.seconds,
                            valid_tracks=args.valid_tracks, test_tracks=args.test_tracks,
                            seed=args.seed, subtype=args.subtype)
    print(f"wrote {root}")


if __name__ == "__main__":
    main()
