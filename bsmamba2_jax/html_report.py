"""The evaluation as a page to read, sort and listen to: one folder, opened from disk.

    <folder>/report.html     everything but the media; its style and script are inline
    <folder>/media/          audio clips (Ogg Vorbis or FLAC) and PNG images, named by position

The page: which weights were scored and how (the protocol), Table II with its notes, Table III,
Table IV with its plot, the silent-region leakage, a per-track table that sorts by any column
(click its header), and, for each track (or the worst/best N by the first model's uSDR), its
excerpts (`bsmamba2_jax.excerpts`: vocal onsets and the silent stretch) with players and mel
spectrograms of the mixture, the reference and each model's estimate side by side, one column per
model. Nothing is fetched from anywhere else (no server, no network); plain Python writes it.

It takes what evaluate.py has already computed (identities, summaries, per-track results, the
tables of `bsmamba2_jax.reports`) and reads audio through `bsmamba2_jax.eval_io` /
`bsmamba2_jax.audio_files`: the mixture and reference from the dataset, each estimate's clips
from the run folder where evaluation stored them (`excerpts.save`).

Size: each clip of 4 s is one audio file and one image per player: (2 + models) of each per
excerpt. `AUDIO_FORMATS` gives the encodings.
"""

from __future__ import annotations

import dataclasses
import html
import os
import re
import shutil
import uuid
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from bsmamba2_jax import audio_files, eval_io, excerpts, plots, reports

PAGE = "report.html"
MEDIA = "media"
# suffix, soundfile format and subtype, keyword arguments. Vorbis at libsndfile compression 0.4
# (quality 0.6, about 160-190 kbit/s for stereo music); FLAC 16-bit is lossless at that depth.
AUDIO_FORMATS = {
    "ogg": (".ogg", "OGG", "VORBIS", {"compression_level": 0.4}),
    "flac": (".flac", "FLAC", "PCM_16", {}),
}
SELECTION_RE = re.compile(r"^(all|(worst|best):([1-9][0-9]*))$")


@dataclasses.dataclass(frozen=True)
class Selection:
    """Which tracks get excerpts: all, or the `count` worst / best by the first model's uSDR."""

    order: str = "all"  # "all", "worst" or "best"
    count: int = 0

    @classmethod
    def parse(cls, text: str) -> Selection:
        """"all", "worst:N" or "best:N" (N >= 1); ValueError naming the forms otherwise."""
        m = SELECTION_RE.match(str(text).strip())
        if m is None:
            raise ValueError(f"{text!r} is not a track selection; give all, worst:N or best:N "
                             "(N >= 1 tracks, ranked by the first model's uSDR)")
        return cls("all") if m.group(1) == "all" else cls(m.group(2), int(m.group(3)))

    def pick(self, names: Sequence[str], usdr: Mapping[str, Any]) -> list[str]:
        """The chosen track names: in track order for all, else ranked (undefined uSDR last)."""
        if self.order == "all":
            return list(names)
        sign = 1.0 if self.order == "worst" else -1.0

        def key(name: str) -> tuple[bool, float]:
            v = reports.from_json(usdr.get(name))
            return (not np.isfinite(v), sign * v if np.isfinite(v) else 0.0)

        return sorted(names, key=key)[:self.count]

    def describe(self) -> str:
        if self.order == "all":
            return "every track"
        return f"the {self.count} {self.order} tracks by the first model's uSDR"


# ----------------------------------------------------------------------------- HTML pieces


def esc(x: Any) -> str:
    return html.escape(str(x), quote=True)


def markdown_table(text: str, css: str = "") -> str:
    """A Markdown table of `bsmamba2_jax.reports` (| a | b |, a |---:| row) -> an HTML table,
    right-aligned where the Markdown says so."""
    rows = [[c.strip() for c in line.strip().strip("|").split("|")]
            for line in text.strip().splitlines()]
    head, rule, body = rows[0], rows[1], rows[2:]
    right = [c.endswith(":") for c in rule]
    out = [f'<table class="{esc(css)}"><thead><tr>'
           + "".join(f"<th>{esc(c)}</th>" for c in head) + "</tr></thead><tbody>"]
    for row in body:
        out.append("<tr>" + "".join(f'<td{" class=num" if r else ""}>{esc(c)}</td>'
                                    for c, r in zip(row, right, strict=True)) + "</tr>")
    return "\n".join(out) + "</tbody></table>"


def _db(x: Any) -> str:
    v = reports.from_json(x)
    return f"{v:.2f} dB" if np.isfinite(v) else ("undefined" if np.isnan(v) else f"{v} dB")


def _num_cell(x: Any, digits: int = 2) -> str:
    """A numeric cell whose data-value sorts (empty = undefined, sorted last)."""
    v = reports.from_json(x)
    if not np.isfinite(v):
        text = "-" if np.isnan(v) else ("inf" if v > 0 else "-inf")
        return f'<td class="num" data-value="">{text}</td>'
    return f'<td class="num" data-value="{v!r}">{v:.{digits}f}</td>'


def track_table(labels: Sequence[str], results: Mapping[str, Sequence[dict]],
                anchors: Mapping[str, str]) -> str:
    """Per track: length, vocal-silent seconds, and each model's uSDR, cSDR and leakage; a
    sortable table (its script is `SCRIPT`). anchors: {track name: id of its excerpts}."""
    by_name = {label: {r["name"]: r for r in results[label]} for label in labels}
    first = results[labels[0]]
    heads = ["track", "seconds", "silent vocals (s)"]
    for label in labels:
        prefix = f"{label} " if len(labels) > 1 else ""
        heads += [f"{prefix}uSDR", f"{prefix}cSDR", f"{prefix}leakage (dB)"]
    out = ['<table class="sortable" id="tracks"><thead><tr>'
           + "".join(f'<th><button type="button">{esc(h)}</button></th>' for h in heads)
           + "</tr></thead><tbody>"]
    for r in first:
        name = r["name"]
        cell = (f'<a href="#{esc(anchors[name])}">{esc(name)}</a>' if name in anchors
                else esc(name))
        row = [f'<td data-value="{esc(name)}">{cell}</td>', _num_cell(r.get("seconds"), 1),
               _num_cell(r.get("silent_seconds"), 0)]
        for label in labels:
            other = by_name[label].get(name, {})
            row += [_num_cell(other.get(k)) for k in ("usdr", "csdr", "leakage_db")]
        out.append("<tr>" + "".join(row) + "</tr>")
    return "\n".join(out) + "</tbody></table>"


def leakage_table(summaries: Mapping[str, dict], results: Mapping[str, Sequence[dict]]) -> str:
    """Per model: median and mean leakage over the tracks with vocal-silent seconds, how many,
    and the vocal-silent seconds in all."""
    lines = ["| Model | median (dB) | mean (dB) | tracks | silent seconds |",
             "|---|---:|---:|---:|---:|"]
    for label, s in summaries.items():
        st = s["stats"]["leakage_db"]
        silent = sum(float(r.get("silent_seconds") or 0.0) for r in results[label])
        cells = ["-" if st[k] is None else f"{st[k]:.2f}" for k in ("median", "mean")]
        lines.append(f"| {label} | {cells[0]} | {cells[1]} | {st['n']} | {silent:.0f} |")
    return markdown_table("\n".join(lines))


STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 1.5em auto; max-width: 1200px;
       padding: 0 1em; color: #1d1d1f; }
h1 { font-size: 1.5em; margin-bottom: .2em; } h2 { margin-top: 1.8em; }
table { border-collapse: collapse; margin: .6em 0; }
th, td { border-bottom: 1px solid #ddd; padding: .25em .6em; text-align: left; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
table.sortable th button { font: inherit; font-weight: 600; border: 0; background: none;
                           cursor: pointer; padding: 0; }
table.sortable th[aria-sort=ascending] button::after { content: " \\25B2"; }
table.sortable th[aria-sort=descending] button::after { content: " \\25BC"; }
.note { color: #6e4a00; background: #fff7e0; padding: .3em .6em; margin: .3em 0; }
.muted { color: #666; }
.track { border-top: 2px solid #ccc; margin-top: 1.5em; }
.excerpt { margin: .8em 0 1.4em; }
.players { display: grid; gap: .6em; }
.players figure { margin: 0; }
.players figcaption { font-weight: 600; }
.players audio { width: 100%; height: 32px; }
.players img { width: 100%; height: 90px; display: block; image-rendering: auto; }
img.plot { max-width: 100%; }
img.scale { width: 240px; height: 12px; vertical-align: middle; }
code { background: #f3f3f3; padding: 0 .2em; }
"""

# Sorting: click a header; numbers by their data-value, undefined ones last either way.
SCRIPT = """
document.querySelectorAll("table.sortable").forEach(function (table) {
  var heads = table.tHead.rows[0].cells;
  Array.prototype.forEach.call(heads, function (th, col) {
    th.querySelector("button").addEventListener("click", function () {
      var up = th.getAttribute("aria-sort") !== "ascending";
      Array.prototype.forEach.call(heads, function (h) { h.removeAttribute("aria-sort"); });
      th.setAttribute("aria-sort", up ? "ascending" : "descending");
      var body = table.tBodies[0];
      var rows = Array.prototype.slice.call(body.rows);
      function key(row) {
        var v = row.cells[col].getAttribute("data-value");
        if (v === null || v === "") return null;
        var n = Number(v);
        return isNaN(n) ? v.toLowerCase() : n;
      }
      rows.sort(function (a, b) {
        var x = key(a), y = key(b);
        if (x === null || y === null) return (x === null) - (y === null);
        var c = x < y ? -1 : x > y ? 1 : 0;
        return up ? c : -c;
      });
      rows.forEach(function (row) { body.appendChild(row); });
    });
  });
});
"""


# ----------------------------------------------------------------------------- media


def _write_clip(path: Path, audio: np.ndarray, rate: int, audio_format: str) -> None:
    import soundfile as sf

    _, fmt, subtype, kwargs = AUDIO_FORMATS[audio_format]
    sf.write(str(path), np.clip(audio, -1.0, 1.0).T, rate, format=fmt, subtype=subtype,
             **kwargs)


def _excerpt_players(folder: Path, stem: str, clips: Sequence[tuple[str, np.ndarray | None]],
                     rate: int, audio_format: str) -> str:
    """Players and mel images of one excerpt, one column per (role, clip) pair; a clip of None
    (no stored estimate) is named as missing."""
    suffix = AUDIO_FORMATS[audio_format][0]
    present = [c for _, c in clips if c is not None]
    images = iter(plots.mel_images(present, rate, **plots.PREVIEW_MEL))
    cells = []
    for k, (role, clip) in enumerate(clips):
        if clip is None:
            cells.append(f'<figure><figcaption>{esc(role)}</figcaption><p class="muted">no clip '
                         'stored for this model: evaluate it again with the report on</p>'
                         '</figure>')
            continue
        name = f"{stem}-{k}"
        _write_clip(folder / MEDIA / f"{name}{suffix}", clip, rate, audio_format)
        plots.write_png(folder / MEDIA / f"{name}.png", next(images))
        cells.append(f'<figure><figcaption>{esc(role)}</figcaption>'
                     f'<audio controls preload="metadata" src="{MEDIA}/{name}{suffix}"></audio>'
                     f'<img src="{MEDIA}/{name}.png" alt="mel spectrogram: {esc(role)}">'
                     '</figure>')
    return (f'<div class="players" style="grid-template-columns: repeat({len(clips)}, 1fr)">'
            + "".join(cells) + "</div>")


def listening(folder: Path, labels: Sequence[str], names: Sequence[str],
              tracks: Mapping[str, Any], run_dirs: Mapping[str, Path],
              results: Mapping[str, Mapping[str, dict]], rate: int,
              audio_format: str) -> tuple[str, dict[str, str]]:
    """The excerpts section of the chosen tracks -> (HTML, {track name: its anchor id})."""
    parts, anchors = [], {}
    for t, name in enumerate(names):
        anchor = f"track-{t}"
        anchors[name] = anchor
        stored = {label: excerpts.load(Path(run_dirs[label]) / "excerpts" / name)
                  for label in labels}
        spans = next((s for s in stored.values() if s is not None), None)
        scores = "; ".join(
            f"{esc(label)}: uSDR {_db(results[label][name].get('usdr'))}, "
            f"leakage {_db(results[label][name].get('leakage_db'))}"
            for label in labels if name in results[label])
        parts.append(f'<section class="track" id="{anchor}"><h3>{esc(name)}</h3>'
                     f'<p class="muted">{scores}</p>')
        if not spans:
            why = ("no clips were stored for this track" if spans is None else
                   "the reference vocals have neither an onset nor a silent second")
            parts.append(f'<p class="muted">No excerpt: {why}.</p></section>')
            continue
        track = tracks[name]
        mixture = eval_io.read_audio(eval_io.stem_path(track, "mixture"), rate)
        vocals = eval_io.read_audio(eval_io.stem_path(track, "vocals"), rate)
        for e, span in enumerate(spans):
            clips: list[tuple[str, np.ndarray | None]] = [
                ("mixture", mixture[:, span.start:span.stop]),
                ("reference vocals", vocals[:, span.start:span.stop])]
            for label in labels:
                mine = stored[label]
                if mine is None or e >= len(mine) or mine[e] != span:
                    clips.append((label, None))
                    continue
                clip, _ = audio_files.read_checked(
                    excerpts.clip_file(Path(run_dirs[label]) / "excerpts" / name, e))
                clips.append((label, clip))
            parts.append(f'<div class="excerpt"><p>{esc(span.describe(rate))}</p>'
                         + _excerpt_players(folder, f"t{t}-e{e}", clips, rate, audio_format)
                         + "</div>")
        parts.append("</section>")
    return "\n".join(parts), anchors


# ----------------------------------------------------------------------------- the page


def write_report(folder: str | Path, *, split: str, settings: Mapping[str, Any],
                 identities: Mapping[str, Mapping[str, Any]], summaries: Mapping[str, dict],
                 onsets: Mapping[str, dict], results: Mapping[str, Sequence[dict]],
                 run_dirs: Mapping[str, str | Path], tracks: Sequence[Any],
                 sweeps: Mapping[str, Mapping[float, dict]] | None = None,
                 sweep_png: str | Path | None = None, selection: Selection = Selection(),
                 listen: bool = True, audio_format: str = "ogg", rate: int = 44100) -> Path:
    """Writes the report folder; returns the path of its report.html.

    Args:
      folder: the report's folder; an old one is replaced as a whole once the new one is
        complete (it is written beside it first).
      split, settings: the protocol (segment_seconds, overlap, shifts, data_root, ...).
      identities, summaries, onsets, results: {label: ...} per model, in column order: the
        `eval_io.model_identity`, `reports.summarize`, `reports.onset_summary` and the per-track
        results of `evaluation.evaluate_tracks`.
      run_dirs: {label: the run folder whose excerpts/ holds the estimate's clips}.
      tracks: the evaluated tracks (`bsmamba2_jax.data.Track`s or folders), for the mixture and
        reference clips.
      sweeps, sweep_png: Table IV ({label: {seconds: summary}}) and its plot, when swept.
      selection: which tracks get excerpts; listen: False = tables only (no excerpts kept).
      audio_format: a key of AUDIO_FORMATS.
    """
    if audio_format not in AUDIO_FORMATS:
        raise ValueError(f"Unknown audio format {audio_format!r}; choose one of "
                         f"{sorted(AUDIO_FORMATS)}")
    folder = Path(folder)
    labels = list(identities)
    by_track = {label: {r["name"]: r for r in results[label]} for label in labels}
    names = [r["name"] for r in results[labels[0]]]
    chosen = (selection.pick(names, {n: r.get("usdr") for n, r in by_track[labels[0]].items()})
              if listen else [])
    track_of = {eval_io.track_name(t): t for t in tracks}

    folder.parent.mkdir(parents=True, exist_ok=True)
    work = folder.with_name(f".{folder.name}.{os.getpid()}-{uuid.uuid4().hex[:12]}.tmp")
    try:
        (work / MEDIA).mkdir(parents=True)
        sound, anchors = listening(work, labels, chosen, track_of, run_dirs, by_track, rate,
                                   audio_format)
        plots.write_png(work / MEDIA / "scale.png",
                        plots.colour_image(np.linspace(-80.0, 0.0, 240)[None].repeat(12, 0)))
        sweep_html = ""
        if sweeps:
            img = ""
            if sweep_png is not None and Path(sweep_png).is_file():
                shutil.copyfile(sweep_png, work / MEDIA / "sweep.png")
                img = f'<img class="plot" src="{MEDIA}/sweep.png" alt="Table IV plot">'
            sweep_html = ("<h2>Table IV: input-length sweep</h2>"
                          + markdown_table(reports.table4(sweeps)) + img)
        page = _page(split, settings, identities, summaries, onsets, results, sweep_html,
                     track_table(labels, results, anchors), sound, selection, len(chosen))
        (work / PAGE).write_text(page, encoding="utf-8")
        old = folder.with_name(f".{folder.name}.{os.getpid()}-{uuid.uuid4().hex[:12]}.old")
        if folder.exists():
            os.replace(folder, old)
        os.replace(work, folder)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return folder / PAGE


def _page(split: str, settings: Mapping[str, Any], identities: Mapping[str, Mapping[str, Any]],
          summaries: Mapping[str, dict], onsets: Mapping[str, dict],
          results: Mapping[str, Sequence[dict]], sweep_html: str, tracks_html: str,
          sound_html: str, selection: Selection, chosen: int) -> str:
    labels = list(identities)
    n_tracks = len(results[labels[0]])
    protocol = ", ".join(f"{k} {v}" for k, v in settings.items())
    notes = "".join(f'<p class="note">{esc(f"{label}: " if len(labels) > 1 else "")}'
                    f"{esc(note)}</p>" for label, s in summaries.items() for note in s["notes"])
    title = f"Evaluation: {split}, {n_tracks} tracks, " + " vs ".join(labels)
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{esc(title)}</title><style>{STYLE}</style></head>
<body>
<h1>{esc(title)}</h1>
<p class="muted">Written by evaluate.py at {when}. Protocol: split {esc(split)},
{esc(protocol)}.</p>
<h2>What was scored</h2>
{markdown_table(reports.models_table(identities))}
<h2>Table II</h2>
<p>uSDR: mean over tracks; cSDR: median over tracks of each track's median 1 s frame SDR
(museval v4, the vocals scored alone); the accompaniment (mixture - estimate) scored alone;
leakage: median over tracks.</p>
{markdown_table(reports.table2(summaries))}
{notes}
<h2>Table III: uSDR of vocal-active stretches by length</h2>
{markdown_table(reports.table3(onsets))}
{sweep_html}
<h2>Silent-region leakage</h2>
<p>The estimate's energy in the 1 s frames where the reference vocals are silent (at or below
-60 dBFS), relative to the mixture's in the same frames; lower is better.</p>
{leakage_table(summaries, results)}
<h2>Tracks</h2>
<p class="muted">Click a column's header to sort by it (again to reverse).</p>
{tracks_html}
<h2>Listening</h2>
<p class="muted">Excerpts of {esc(selection.describe() if chosen else "no track")}
({chosen}): vocal onsets after the longest silences and the longest silent stretch of the
reference vocals. Mel spectrograms
(0-16 kHz, low frequencies at the bottom) of one excerpt share one scale, dB relative to its
loudest bin: <img class="scale" src="{MEDIA}/scale.png" alt="colour scale"> -80 to 0 dB.</p>
{sound_html}
<script>{SCRIPT}</script>
</body></html>
"""
