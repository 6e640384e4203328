"""MUSDB18-HQ track lists, splits and file checks; cropped reads with soundfile.

Layout: `ROOT/{train,test}/<track>/{mixture,vocals,drums,bass,other}.wav`, 44.1 kHz stereo.
Splits come from `musdb` (imported lazily: it imports stempeg, which wants ffmpeg):
  - "train": ROOT/train minus the validation tracks, "valid": the validation tracks,
    "test": ROOT/test;
  - the validation list is musdb's built-in `validation_tracks` (14 MUSDB18 songs) unless ROOT has
    a musdb setup file `musdb_setup.yaml` (the synthetic generator writes one naming its own
    validation tracks), which is then passed to `musdb.DB(setup_file=...)`.
A root without that file is taken as the real MUSDB18-HQ and must hold the full 86 / 14 / 50 split.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from collections.abc import Iterable, Mapping

import numpy as np

from bsmamba2_jax import audio_files

SAMPLE_RATE = 44100
CHANNELS = 2
STEMS = ("vocals", "drums", "bass", "other")  # the four sources, in mixing order
FILES = ("mixture",) + STEMS
SPLITS = ("train", "valid", "test")
SETUP_FILE = "musdb_setup.yaml"
# The standard MUSDB18-HQ split (musdb's validation_tracks): tracks each split needs.
STANDARD_SPLIT_SIZES = {"train": 86, "valid": 14, "test": 50}


@dataclasses.dataclass(frozen=True)
class Track:
    """One multitrack.

    name: the folder name ("Artist - Title"). subset: "train" or "test" (the folder it lives in).
    paths: "mixture" and each stem -> wav path. num_samples: frames per file (all files agree).
    """

    name: str
    subset: str
    paths: Mapping[str, pathlib.Path]
    num_samples: int


def check_root(root: str | os.PathLike) -> pathlib.Path:
    """The root as a Path; ValueError if it or its train/ and test/ folders are missing."""
    path = pathlib.Path(root).expanduser()
    if not path.is_dir():
        raise ValueError(f"MUSDB18-HQ root {str(path)!r} does not exist or is not a folder; set "
                         "--config.data.root to the folder holding train/ and test/, or leave it "
                         "empty to use the synthetic dataset")
    for subset in ("train", "test"):
        if not (path / subset).is_dir():
            raise ValueError(f"MUSDB18-HQ root {str(path)!r} has no {subset}/ folder; expected "
                             f"ROOT/{{train,test}}/<track>/{{{','.join(FILES)}}}.wav")
    return path


def check_wav(path: pathlib.Path) -> int:
    """Frames of a complete 44.1 kHz stereo wav; ValueError naming the file and what it found
    otherwise (a truncated file among them: the five files of a track cut the same way agree in
    length, so only the header shows it). Reads the header only; the samples are checked where
    they are read whole (`activity.activity_index`, `eval_io.read_audio`)."""
    import soundfile as sf

    try:
        info = sf.info(str(path))
    except (RuntimeError, sf.LibsndfileError) as e:  # not a readable audio file
        raise ValueError(f"{path}: cannot read as audio ({e})") from e
    audio_files.check_complete(path, int(info.frames), int(info.samplerate), info.format)
    if info.samplerate != SAMPLE_RATE:
        raise ValueError(f"{path}: sample rate {info.samplerate} Hz, expected {SAMPLE_RATE} Hz; "
                         "resample the dataset (MUSDB18-HQ is 44.1 kHz)")
    if info.channels != CHANNELS:
        raise ValueError(f"{path}: {info.channels} channel(s), expected {CHANNELS} (stereo)")
    return int(info.frames)


def check_track_folder(folder: pathlib.Path, subset: str) -> Track:
    """Checks one track folder (all five files present, 44.1 kHz stereo, equal lengths)."""
    paths = {name: folder / f"{name}.wav" for name in FILES}
    for name, path in paths.items():
        if not path.is_file():
            raise ValueError(f"track {folder.name!r} in {folder.parent} is missing its "
                             f"{name!r} stem: {path} not found")
    lengths = {name: check_wav(path) for name, path in paths.items()}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"track {folder.name!r}: files differ in length (frames) {lengths}; "
                         "stems must be sample-aligned")
    return Track(folder.name, subset, paths, lengths["mixture"])


def _track_folders(root: pathlib.Path, subset: str) -> list[pathlib.Path]:
    return sorted(p for p in (root / subset).iterdir() if p.is_dir() and not p.name.startswith("."))


def _setup_file(root: pathlib.Path) -> str | None:
    return SETUP_FILE if (root / SETUP_FILE).is_file() else None


def validation_names(root: str | os.PathLike) -> list[str]:
    """The validation track names that apply to `root` (its setup file's or musdb's)."""
    import yaml  # a musdb dependency

    root = check_root(root)
    if (root / SETUP_FILE).is_file():
        setup_path = root / SETUP_FILE
    else:
        import musdb

        setup_path = pathlib.Path(musdb.__path__[0]) / "configs" / "mus.yaml"
    with open(setup_path) as f:
        names = yaml.safe_load(f).get("validation_tracks")
    if not names:
        raise ValueError(f"{setup_path} lists no validation_tracks")
    return list(names)


def list_tracks(root: str | os.PathLike, split: str) -> list[Track]:
    """Tracks of one split, sorted by name, every file checked.

    Args:
      root: MUSDB18-HQ(-shaped) root.
      split: "train" (ROOT/train without the validation tracks), "valid" or "test".
    Returns:
      list of Track. Raises ValueError for a missing root, stem or validation track, a file that
      is not 44.1 kHz stereo, or fewer tracks than the split needs.
    """
    if split not in SPLITS:
        raise ValueError(f"Unknown split {split!r}; choose one of {SPLITS}")
    root = check_root(root)
    subset = "test" if split == "test" else "train"
    folders = _track_folders(root, subset)
    setup = _setup_file(root)
    valid = validation_names(root)
    if subset == "train":
        missing = sorted(set(valid) - {f.name for f in folders})
        if missing:
            more = " ..." if len(missing) > 5 else ""
            raise ValueError(f"{root / 'train'} lacks {len(missing)} of the {len(valid)} "
                             f"validation tracks the split needs: {missing[:5]}{more} "
                             f"(validation list from {setup or 'musdb mus.yaml'})")
    checked = {f.name: check_track_folder(f, subset) for f in folders}

    import musdb  # lazily: stempeg wants ffmpeg/ffprobe on PATH

    db = musdb.DB(root=str(root), is_wav=True, subsets=subset,
                  split=None if split == "test" else split, setup_file=setup)
    tracks = [checked[t.name] for t in db.tracks]
    needed = 1 if setup else STANDARD_SPLIT_SIZES[split]
    if len(tracks) < needed:
        hint = (f"is the MUSDB18-HQ download complete? For another dataset, put a musdb setup "
                f"file {SETUP_FILE} naming its validation tracks in the root"
                if not setup else "add tracks")
        raise ValueError(f"split {split!r} of {root} has {len(tracks)} track(s), needs at least "
                         f"{needed}; {hint}")
    return tracks


def check_split_disjoint(root: str | os.PathLike, train_tracks: Iterable[Track | str]) -> None:
    """Raises ValueError if any training track is a validation or test track (name or file)."""
    held_out = list_tracks(root, "valid") + list_tracks(root, "test")
    names = {t.name for t in held_out}
    files = {p.resolve() for t in held_out for p in t.paths.values()}
    leaked = []
    for t in train_tracks:
        if isinstance(t, str):
            hit = t in names
        else:
            hit = t.name in names or any(p.resolve() in files for p in t.paths.values())
        if hit:
            leaked.append(t if isinstance(t, str) else t.name)
    if leaked:
        raise ValueError(f"validation/test tracks would enter training: {sorted(leaked)}")


def read_crop(path: str | os.PathLike, start: int, frames: int) -> np.ndarray:
    """Reads `frames` samples from `start` of a stereo wav, decoding only that part.

    Returns (2, frames) float32. ValueError if the file ends before start + frames.
    """
    import soundfile as sf

    audio, _ = sf.read(str(path), start=start, frames=frames, dtype="float32", always_2d=True)
    if audio.shape[0] != frames:
        raise ValueError(f"{path}: asked for samples [{start}, {start + frames}), file has "
                         f"{start + audio.shape[0]}")
    return np.ascontiguousarray(audio.T)
