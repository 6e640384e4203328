"""The job queue of bsmamba2-serve, driven directly with a stand-in model (no web server)."""

from __future__ import annotations

import threading
import time
import zlib

import numpy as np
import pytest
import soundfile as sf
from scipy.signal import resample_poly

from bsmamba2_jax.separate_cli import STEMS, SeparationError, Separator
from bsmamba2_jax.serve.jobs import JobQueue, display_name
from tests.browser import wait_for

RATE = 44100
SEGMENT = 4410  # 0.1 s segments: a 1 s file is 10 of them


def _noise(channels: int, seconds: float, seed: int, rate: int = RATE) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (0.3 * rng.standard_normal((channels, int(round(seconds * rate))))).astype(np.float32)


def _separator(fn=lambda batch: 0.5 * batch) -> Separator:
    return Separator(fn, RATE, SEGMENT, 0.0, 1)


def _submit(jobs: JobQueue, name: str, audio: np.ndarray | bytes, rate: int = RATE,
            fmt: str = "wav"):
    job = jobs.new_job(name, fmt)
    if isinstance(audio, bytes):
        job.upload.write_bytes(audio)
    else:
        sf.write(str(job.upload), audio.T, rate, subtype="FLOAT", format="WAV")
    return jobs.start(job)


def _ended(jobs: JobQueue, job, timeout: float = 60.0) -> dict:
    return wait_for(lambda: (v := jobs.view(job))["state"] in ("done", "failed") and v,
                    timeout, f"job {job.name} to end")


@pytest.fixture
def queue(tmp_path):
    made: list[JobQueue] = []

    def make(separator: Separator | None = None, **kw) -> JobQueue:
        made.append(JobQueue(separator or _separator(), tmp_path / "jobs", **kw))
        return made[-1]

    yield make
    for jobs in made:
        jobs.close()


def test_a_job_separates_its_file_into_its_own_folder(queue):
    """The stems have the input's rate, channels and length (mono at 22.05 kHz: resampled for
    the model and back), vocals = the model's output, accompaniment = mixture - vocals."""
    jobs = queue()
    x = _noise(1, 0.73, seed=zlib.crc32(b"one job"), rate=22050)
    job = _submit(jobs, "../../My song.final.wav", x, rate=22050, fmt="flac")
    assert job.name == "My song.final.wav" and job.folder.parent == jobs.root
    view = _ended(jobs, job)
    assert view["state"] == "done", view["error"]
    assert view["segments_done"] == view["segments_total"] == 8  # 0.73 s in 0.1 s segments
    assert not job.upload.exists()  # only the stems stay
    v, rate = sf.read(str(job.output("vocals")), always_2d=True)
    a, _ = sf.read(str(job.output("accompaniment")), always_2d=True)
    assert rate == 22050 and v.shape == a.shape == (x.shape[1], 1)
    np.testing.assert_allclose(v[:, 0] + a[:, 0], x[0], atol=3e-4)  # 24-bit FLAC
    # The CLI's resampling is resample_poly's: 22.05 -> 44.1 kHz, the model, and back.
    want = resample_poly(0.5 * resample_poly(x[0], 2, 1), 1, 2)
    np.testing.assert_allclose(v[:, 0], want, atol=3e-5)
    assert job.download_name("vocals") == "My song.final_vocals.flac"


def _gated(fn=lambda batch: batch):
    """(model, started, go): the model's first call sets `started` and waits for `go`."""
    started, go = threading.Event(), threading.Event()

    def model(batch):
        started.set()
        assert go.wait(60), "the test never let the model go on"
        return fn(batch)

    return model, started, go


def test_jobs_run_one_at_a_time_in_order(queue):
    running, most = [0], [0]
    lock = threading.Lock()

    def counted(batch):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.005)
        with lock:
            running[0] -= 1
        return batch

    model, started, go = _gated(counted)
    jobs = queue(_separator(model))
    first = _submit(jobs, "song0.wav", _noise(2, 0.5, seed=0))
    assert started.wait(30)
    later = [_submit(jobs, f"song{i}.wav", _noise(2, 0.5 + 0.1 * i, seed=i)) for i in (1, 2, 3)]
    assert jobs.view(first)["state"] == "running" and jobs.view(first)["ahead"] is None
    assert [jobs.view(j)["ahead"] for j in later] == [1, 2, 3]  # the running one counts
    assert [jobs.view(j)["state"] for j in later] == ["queued"] * 3
    go.set()
    views = [_ended(jobs, j) for j in [first] + later]
    assert [v["state"] for v in views] == ["done"] * 4
    assert most[0] == 1  # never two model calls at once
    ends = [j.ended for j in [first] + later]
    assert ends == sorted(ends)  # in the order they came


def test_a_crash_in_one_job_fails_that_job_only(queue):
    """The model raising on one file's audio fails that job with the message in words; the jobs
    before and after it are done."""

    def fragile(batch):
        if np.abs(batch).max() > 5:  # only the loud file
            raise FloatingPointError("overflow in the mask")
        return batch

    jobs = queue(_separator(fragile))
    good = _submit(jobs, "a.wav", _noise(2, 0.3, seed=1))
    loud = _submit(jobs, "loud.wav", 20 * _noise(2, 0.3, seed=2))
    after = _submit(jobs, "b.wav", _noise(2, 0.3, seed=3))
    assert _ended(jobs, good)["state"] == "done"
    failed = _ended(jobs, loud)
    assert failed["state"] == "failed"
    assert failed["error"] == ("loud.wav: separation failed: FloatingPointError: overflow in "
                               "the mask")
    assert not loud.output("vocals").exists() and not loud.upload.exists()
    assert _ended(jobs, after)["state"] == "done"


@pytest.mark.parametrize("content,says", [
    (b"ID3\x03\x00 not audio at all" * 20, "cannot read it as audio"),
    (None, "non-finite samples"),
])
def test_a_bad_upload_is_refused_in_words_naming_the_file(queue, content, says):
    jobs = queue()
    if content is None:  # a WAV with a NaN
        x = _noise(2, 0.2, seed=5)
        x[1, 7] = np.nan
        job = jobs.new_job("nan.wav", "wav")
        sf.write(str(job.upload), x.T, RATE, subtype="FLOAT", format="WAV")
        name = "nan.wav"
    else:
        job = jobs.new_job("song.mp3", "wav")
        job.upload.write_bytes(content)
        name = "song.mp3"
    with pytest.raises(SeparationError) as e:
        jobs.start(job)
    text = str(e.value)
    assert text.startswith(f"{name}: ") and says in text
    assert str(jobs.root) not in text  # the server's paths are not the client's business
    assert not job.folder.exists() and jobs.get(job.id) is None


def test_nonfinite_zero_runs_with_a_warning(queue):
    jobs = queue(nonfinite="zero")
    x = _noise(2, 0.2, seed=6)
    x[0, 3] = np.inf
    view = _ended(jobs, _submit(jobs, "inf.wav", x))
    assert view["state"] == "done"
    assert view["warnings"] == ["inf.wav: 1 non-finite samples (NaN or Inf) replaced by zeros "
                                "(the server runs with --nonfinite zero)"]


def test_deleting_a_running_job_stops_it_and_removes_its_files(queue):
    model, started, go = _gated()
    jobs = queue(_separator(model))
    long = _submit(jobs, "long.wav", _noise(2, 3.0, seed=7))  # 30 segments
    short = _submit(jobs, "short.wav", _noise(2, 0.2, seed=8))
    assert started.wait(30) and jobs.view(long)["state"] == "running"
    assert jobs.delete(long.id) and jobs.get(long.id) is None
    go.set()
    assert _ended(jobs, short)["state"] == "done"
    wait_for(lambda: not long.folder.exists(), 30, "the deleted job's folder to go")
    assert long.segments_done == 1  # it stopped after the batch it was in
    assert not jobs.delete(long.id)  # gone


def test_finished_jobs_expire_after_the_ttl(queue):
    jobs = queue(ttl=0.4)
    job = _submit(jobs, "song.wav", _noise(2, 0.2, seed=9))
    assert _ended(jobs, job)["state"] == "done"
    assert 0 < jobs.view(job)["expires_in"] <= 0.4
    assert job.output("vocals").exists()
    wait_for(lambda: jobs.get(job.id) is None, 30, "the janitor to expire the job")
    assert not job.folder.exists()


def test_close_removes_every_job_and_the_root(queue):
    model, started, go = _gated()
    jobs = queue(_separator(model))
    running = _submit(jobs, "b.wav", _noise(2, 2.0, seed=11))
    waiting = _submit(jobs, "c.wav", _noise(2, 0.2, seed=12))
    assert started.wait(30)
    threading.Timer(0.2, go.set).start()  # the batch in flight ends while close waits
    jobs.close()
    assert not jobs.root.exists()
    assert jobs.get(waiting.id) is None and running.segments_done == 1
    with pytest.raises(RuntimeError, match="shutting down"):
        jobs.new_job("late.wav", "wav")


def test_display_names_and_bad_arguments(queue):
    assert display_name("C:\\Users\\me\\a\x00b\x1b.wav") == "ab.wav"
    assert display_name("") == display_name(None) == display_name("/") == "upload"
    assert len(display_name("x" * 1000)) == 200
    jobs = queue()
    with pytest.raises(ValueError, match="format='mp3' is not one of"):
        jobs.new_job("a.wav", "mp3")
    with pytest.raises(ValueError, match="ttl=0 must be a positive"):
        JobQueue(_separator(), jobs.root, ttl=0)
    assert set(STEMS) == {"vocals", "accompaniment"}
