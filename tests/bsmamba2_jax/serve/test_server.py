"""bsmamba2-serve as a person uses it: the installed command on a free localhost port with the
tiny model, driven over HTTP (as curl would) and in headless Chromium.

One server for the module (loading and compiling the model is most of the time), run in one
test process (xdist_group); it is stopped with Ctrl+C (SIGINT) at the end, which must leave no
job files behind.
"""

from __future__ import annotations

import http.client
import io
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import zlib
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import quote

import numpy as np
import pytest
import soundfile as sf

from tests.browser import wait_for, wait_for_download

pytest.importorskip("uvicorn", reason="bsmamba2-serve needs the [serve] extra: "
                                      "pip install -e '.[serve]'")
pytestmark = pytest.mark.xdist_group("serve")

MAX_UPLOAD_MB = 1  # small, so the limit is cheap to cross
SEGMENT_SECONDS = 1.0
STARTUP = 600.0  # seconds to import JAX and compile the tiny model on a busy 2-core machine
JOB = 120.0  # seconds for a job of a few seconds of audio to finish
HTTP = 30.0  # seconds for any one request


class Server(NamedTuple):
    host: str
    port: int
    tmp: Path  # the server's TMPDIR: its jobs folder lives here
    log: Path  # its stderr


class Reply(NamedTuple):
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        assert self.headers.get("content-type", "").startswith("application/json"), self
        return json.loads(self.body)


def _command() -> list[str]:
    script = Path(sys.executable).with_name("bsmamba2-serve")  # the console entry point
    return [str(script)] if script.exists() else [sys.executable, "-m", "bsmamba2_jax.serve"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from bsmamba2_jax import export
    from tests.bsmamba2_jax.tiny_model import tiny_model_and_params

    folder = tmp_path_factory.mktemp("serve")
    _, params, config = tiny_model_and_params()
    model = export.save_model(folder / "tiny.msgpack", params, config)
    tmp = folder / "tmp"
    tmp.mkdir()
    log = folder / "server.log"
    env = dict(os.environ, TMPDIR=str(tmp), PYTHONUNBUFFERED="1")
    with open(log, "w") as err:
        proc = subprocess.Popen(
            _command() + ["--checkpoint", str(model), "--port", "0", "--segment-seconds",
                          str(SEGMENT_SECONDS), "--max-upload-mb", str(MAX_UPLOAD_MB)],
            stdout=subprocess.PIPE, stderr=err, text=True, env=env)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout], daemon=True).start()
    try:
        line = lines.get(timeout=STARTUP)
    except queue.Empty:
        line = ""
    match = re.match(r"serving on http://([\d.]+):(\d+)/", line)
    if match is None:
        proc.kill()
        proc.wait(timeout=60)
        pytest.fail(f"bsmamba2-serve did not start: {line!r}\n{log.read_text()}")
    yield Server(match[1], int(match[2]), tmp, log)
    proc.send_signal(signal.SIGINT)  # Ctrl+C
    try:
        code = proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=60)
        raise AssertionError(f"bsmamba2-serve did not stop on Ctrl+C\n{log.read_text()}") from None
    left = list(tmp.rglob("*"))
    assert code == 0 and not left, (code, left, log.read_text())


def _request(server: Server, method: str, path: str, body: Any = None,
             headers: dict[str, str] | None = None, chunked: bool = False) -> Reply:
    conn = http.client.HTTPConnection(server.host, server.port, timeout=HTTP)
    try:
        conn.request(method, path, body=body, headers=headers or {}, encode_chunked=chunked)
        response = conn.getresponse()
        return Reply(response.status, {k.lower(): v for k, v in response.getheaders()},
                     response.read())
    finally:
        conn.close()


def _wav(audio: np.ndarray, rate: int, subtype: str = "FLOAT") -> bytes:
    buf = io.BytesIO()
    sf.write(buf, audio.T, rate, subtype=subtype, format="WAV")
    return buf.getvalue()


def _noise(channels: int, seconds: float, rate: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (0.2 * rng.standard_normal((channels, int(round(seconds * rate))))).astype(np.float32)


def _submit(server: Server, data: bytes, name: str, fmt: str | None = None) -> Reply:
    query = f"name={quote(name)}" + (f"&format={fmt}" if fmt else "")
    return _request(server, "POST", f"/api/jobs?{query}", data,
                    {"Content-Type": "application/octet-stream"})


def _ended(server: Server, job_id: str) -> dict:
    def state() -> dict | None:
        job = _request(server, "GET", f"/api/jobs/{job_id}").json()
        return job if job["state"] in ("done", "failed") else None

    return wait_for(state, JOB, f"job {job_id} to end", interval=0.1)


def _stem(server: Server, job: dict, stem: str) -> tuple[np.ndarray, int]:
    reply = _request(server, "GET", job["stems"][stem]["url"])
    assert reply.status == 200, reply
    audio, rate = sf.read(io.BytesIO(reply.body), always_2d=True)
    return audio.T, rate


def _job_folders(server: Server) -> list[Path]:
    return [p for root in server.tmp.glob("bsmamba2-serve-*") for p in root.iterdir()]


# ----------------------------------------------------------------------------- the HTTP API


def test_submit_poll_fetch_delete(server):
    """A mono 8 kHz 16-bit file comes back as FLAC stems of its rate, channels and length,
    vocals + accompaniment = the mixture; deleted, it and its files are gone."""
    x = _noise(1, 2.3, 8000, seed=zlib.crc32(b"round trip"))
    reply = _submit(server, _wav(x, 8000, "PCM_16"), "take 1.wav", fmt="flac")
    assert reply.status == 201, reply
    job = reply.json()
    assert reply.headers["location"] == f"/api/jobs/{job['id']}"
    assert job["state"] in ("queued", "running") and job["segments_total"] == 3
    assert (job["sample_rate"], job["channels"], job["seconds"]) == (8000, 1, 2.3)
    job = _ended(server, job["id"])
    assert job["state"] == "done", job["error"]
    assert job["segments_done"] == 3 and 0 < job["expires_in"] <= 3600
    v, rate_v = _stem(server, job, "vocals")
    a, rate_a = _stem(server, job, "accompaniment")
    assert rate_v == rate_a == 8000 and v.shape == a.shape == x.shape
    mixture = sf.read(io.BytesIO(_wav(x, 8000, "PCM_16")), always_2d=True)[0].T
    np.testing.assert_allclose(v + a, mixture, atol=1e-6)  # 24-bit FLAC of each
    assert np.abs(v).max() > 1e-3  # the model did something
    download = _request(server, "GET", job["stems"]["vocals"]["url"] + "?download=1")
    assert (download.headers["content-disposition"]
            == "attachment; filename*=utf-8''take%201_vocals.flac")
    assert download.headers["content-type"] == "audio/flac"
    assert _request(server, "DELETE", f"/api/jobs/{job['id']}").json() == {"deleted": job["id"]}
    for path in (f"/api/jobs/{job['id']}", job["stems"]["vocals"]["url"]):
        assert _request(server, "GET", path).status == 404
    assert job["id"] not in [p.name for p in _job_folders(server)]


def test_upload_size_limit(server):
    """Past --max-upload-mb: 413 naming the limit and the flag, whether the size is declared or
    only seen while streaming; at the limit the file is judged as audio instead. Nothing stays."""
    limit = MAX_UPLOAD_MB * 2**20
    before = _job_folders(server)
    at_limit = _submit(server, b"\x01" * limit, "big.wav")
    assert at_limit.status == 422 and "cannot read it as audio" in at_limit.json()["error"]
    over = _submit(server, b"\x01" * (limit + 1), "big.wav")
    assert over.status == 413
    assert over.json()["error"] == (
        "big.wav: 1.0 MiB (1048577 bytes) is over this server's upload limit of 1.0 MiB "
        "(1048576 bytes); a larger file needs bsmamba2-serve --max-upload-mb")
    streamed = _request(server, "POST", "/api/jobs?name=stream.wav",
                        iter([b"\x02" * 2**16] * (limit // 2**16 + 1)),
                        {"Content-Type": "application/octet-stream"}, chunked=True)
    assert streamed.status == 413
    assert streamed.json()["error"].startswith("stream.wav: more than 1.0 MiB (1048576 bytes) is "
                                               "over this server's upload limit")
    assert _job_folders(server) == before


@pytest.mark.parametrize("job_id", ["doesnotexist", "A" * 22, "x" * 1000, "%C3%A9t%C3%A9",
                                    "..", "%2e%2e"])
def test_a_job_that_does_not_exist(server, job_id):
    for method, path in [("GET", f"/api/jobs/{job_id}"), ("DELETE", f"/api/jobs/{job_id}"),
                         ("GET", f"/api/jobs/{job_id}/vocals")]:
        reply = _request(server, method, path)
        assert reply.status == 404, (method, path, reply)
        error = reply.json()["error"]
        assert error.startswith(("no job", "nothing at")) and len(error) < 250


def test_no_client_path_reaches_the_file_system(server):
    """Traversal in every part of the URL, raw and percent-encoded, gets a 404 and no file: not
    a secret beside the jobs folder, not the repository's files, not a job's upload."""
    secret = b"the secret next to the jobs folder"
    (server.tmp / "secret.txt").write_bytes(secret)
    job = _submit(server, _wav(_noise(2, 0.5, 44100, seed=7), 44100), "a.wav").json()
    _ended(server, job["id"])
    jid = job["id"]
    paths = [
        "/../secret.txt", "/static/../secret.txt", "/static/..%2f..%2fpyproject.toml",
        "/static/%2e%2e%2fapp.py", "/static/jobs.py", f"/api/jobs/{jid}/../../secret.txt",
        f"/api/jobs/{jid}/..%2f..%2fsecret.txt", f"/api/jobs/{jid}/upload",
        f"/api/jobs/{jid}/vocals.wav", f"/api/jobs/..%2f{jid}/vocals",
        f"/api/jobs/{jid}%2fvocals.wav", "/api/jobs/%2e%2e/%2e%2e/secret.txt",
        "/api/jobs/..%2F..%2Fsecret.txt/vocals", "/%2e%2e/%2e%2e/etc/passwd", "//etc/passwd",
    ]
    try:
        for path in paths:
            reply = _request(server, "GET", path)
            assert reply.status == 404, (path, reply)
            assert secret not in reply.body and b"root:" not in reply.body
            assert b"[project]" not in reply.body and b"import" not in reply.body, path
    finally:
        (server.tmp / "secret.txt").unlink()
        _request(server, "DELETE", f"/api/jobs/{jid}")


def test_concurrent_submissions_are_queued_and_all_finish(server):
    """A long file, then three more at once: each gets its own random id and a place behind the
    first, never two run together, the server answers meanwhile, and all finish."""
    long = _noise(1, 50.0, 8000, seed=1)  # 50 segments, 0.8 MB as 16-bit
    first = _submit(server, _wav(long, 8000, "PCM_16"), "long.wav")
    assert first.status == 201, first
    shorts = {f"s{i}.wav": _noise(2, 1.5, 44100, seed=10 + i) for i in range(3)}
    replies: dict[str, Reply] = {}

    def send(name: str) -> None:
        replies[name] = _submit(server, _wav(shorts[name], 44100, "PCM_16"), name)

    threads = [threading.Thread(target=send, args=(n,)) for n in shorts]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=HTTP * 2)
    jobs = {n: r.json() for n, r in replies.items()}
    assert all(r.status == 201 for r in replies.values()), replies
    assert all(j["state"] == "queued" and j["ahead"] >= 1 for j in jobs.values()), jobs
    # Queue order: the long one, then the three by their place (distinct: one queue).
    queued = sorted(jobs.values(), key=lambda j: j["ahead"])
    assert [j["ahead"] for j in queued] == [1, 2, 3], jobs
    ids = [first.json()["id"]] + [j["id"] for j in queued]
    assert len(set(ids)) == 4 and all(re.fullmatch(r"[A-Za-z0-9_-]{22}", i) for i in ids)
    seen_running = 0

    def all_ended() -> bool:
        nonlocal seen_running
        assert _request(server, "GET", "/api/info").status == 200  # answers while a job runs
        # Polled last-queued first: once a job is seen started, every job queued before it
        # must already have ended when polled after it (one at a time, in order). Polls are
        # separate requests, so "two running in one poll round" would not prove an overlap.
        states = [_request(server, "GET", f"/api/jobs/{i}").json()["state"]
                  for i in reversed(ids)]
        started = [s in ("running", "done", "failed") for s in states]
        first_started = started.index(True) if any(started) else len(states)
        assert all(s in ("done", "failed") for s in states[first_started + 1:]), states
        seen_running += "running" in states
        return all(s in ("done", "failed") for s in states)

    wait_for(all_ended, 4 * JOB, "the four jobs to end", interval=0.05)
    assert seen_running  # polled while one ran
    for name, job in jobs.items():
        job = _ended(server, job["id"])
        assert job["state"] == "done", job["error"]
        v, rate = _stem(server, job, "vocals")
        assert rate == 44100 and v.shape == shorts[name].shape
    for i in ids:
        _request(server, "DELETE", f"/api/jobs/{i}")


def test_refused_requests_say_why(server):
    song = _wav(_noise(2, 0.3, 44100, seed=3), 44100)
    cases = [
        (_request(server, "POST", "/api/jobs?name=a.wav", song,
                  {"Origin": "http://elsewhere.example"}), 403, "cross-site request refused"),
        (_request(server, "DELETE", "/api/jobs/abc", None,
                  {"Origin": "http://elsewhere.example"}), 403, "cross-site request refused"),
        (_request(server, "POST", "/api/jobs?name=a.wav", b"--x\r\n\r\n" + song,
                  {"Content-Type": "multipart/form-data; boundary=x"}), 415,
         "send the audio file itself as the request body, not a form"),
        (_submit(server, song, "a.wav", fmt="mp3"), 400, "format='mp3' is not one of"),
        (_submit(server, b"", "empty.wav"), 422, "empty.wav: the upload is empty"),
        (_request(server, "PUT", "/api/jobs", song), 405, "PUT is not allowed on /api/jobs"),
    ]
    for reply, status, says in cases:
        assert reply.status == status and says in reply.json()["error"], (status, reply)
    # Another name for this machine (DNS rebinding) is not served.
    assert _request(server, "GET", "/api/info", headers={"Host": "evil.example"}).status == 400


# ----------------------------------------------------------------------------- the page


def _song(seconds: float) -> np.ndarray:
    from bsmamba2_jax.data import synthetic

    return sum(synthetic.synthesize_track(0, "test", 0, seconds).stems.values())


def test_the_page_in_chromium(server, browser, tmp_path):
    """Choose a song, a file that is not audio and one over the upload limit on the page: the
    song's job runs and ends with two players that decode and two downloads of the input's
    length and rate; the other two files' errors are on the page in words."""
    from selenium.webdriver.common.by import By

    x = _song(2.5)
    song = tmp_path / "my song.wav"
    sf.write(str(song), x.T, 44100, subtype="FLOAT")
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk" * 40)
    big = tmp_path / "big.wav"
    sf.write(str(big), _song(3.5).T, 44100, subtype="FLOAT")  # 1.2 MiB: over the limit
    browser.get(f"http://{server.host}:{server.port}/")
    wait_for(lambda: browser.execute_script("return document.body.dataset.ready"), HTTP,
             "the page to load the server's settings")
    assert "tiny.msgpack" in browser.find_element(By.ID, "model").text
    options = [o.get_attribute("value") for o in browser.find_elements(By.CSS_SELECTOR,
                                                                       "#format option")]
    assert sorted(options) == ["flac", "wav", "wav16", "wav24"]
    chooser = browser.find_element(By.ID, "files")
    chooser.send_keys(f"{song}\n{bad}\n{big}")

    def card(name: str) -> Any:
        for li in browser.find_elements(By.CSS_SELECTOR, "#jobs .job"):
            if li.find_element(By.CSS_SELECTOR, ".name").text == name:
                return li
        return None

    failed = wait_for(lambda: (c := card("bad.wav")) and c.get_attribute("data-state") == "failed"
                      and c, JOB, "the bad file's error")
    error = failed.find_element(By.CSS_SELECTOR, ".error").text
    assert error.startswith("bad.wav: ") and "cannot read it as audio" in error, error
    too_big = wait_for(lambda: (c := card("big.wav")) and c.get_attribute("data-state")
                       == "failed" and c, HTTP, "the big file's error")
    assert too_big.find_element(By.CSS_SELECTOR, ".error").text == (
        "big.wav: 1.2 MiB is over this server's upload limit of 1.0 MiB; a larger file needs "
        "bsmamba2-serve --max-upload-mb")
    done = wait_for(lambda: (c := card("my song.wav")) and c.get_attribute("data-state") == "done"
                    and c, JOB, "the song's job to be done")
    assert "done: 2.5 s at 44100 Hz" in done.find_element(By.CSS_SELECTOR, ".state").text
    players = done.find_elements(By.CSS_SELECTOR, ".stem audio")
    assert len(players) == 2

    def durations() -> list[float] | None:
        d = browser.execute_script(
            "return arguments[0].map(a => a.error ? -a.error.code : a.duration)", players)
        assert all(v is None or v >= 0 for v in d), f"a player failed to decode: {d}"
        return d if all(v and v > 0 for v in d) else None

    for duration in wait_for(durations, HTTP, "both players to read their stems"):
        assert abs(duration - 2.5) < 0.01
    # Every sample of each player's source decodes in the browser (Web Audio, no sound card).
    decoded = browser.execute_async_script("""
        const [players, done] = arguments;
        Promise.all(players.map(async (a) => {
          const bytes = await (await fetch(a.currentSrc)).arrayBuffer();
          const audio = await new OfflineAudioContext(2, 1, 44100).decodeAudioData(bytes);
          return [audio.length, audio.numberOfChannels];
        })).then(done, (e) => done(String(e)));""", players)
    assert decoded == [[x.shape[1], 2]] * 2, decoded
    for link in done.find_elements(By.CSS_SELECTOR, ".stem a.download"):
        name = link.get_attribute("download")
        link.click()
        path = wait_for_download(tmp_path / "downloads", name, HTTP)
        info = sf.info(str(path))
        assert (info.frames, info.samplerate, info.channels) == (x.shape[1], 44100, 2), name
    assert sorted(p.name for p in (tmp_path / "downloads").iterdir()) == [
        "my song_accompaniment.wav", "my song_vocals.wav"]
    browser.save_screenshot(str(tmp_path / "page.png"))
    # Remove both cards: the job and its files are gone from the server.
    job_id = done.get_attribute("data-job-id")
    for li in (done, failed, too_big):
        li.find_element(By.CSS_SELECTOR, ".remove").click()
    wait_for(lambda: not browser.find_elements(By.CSS_SELECTOR, "#jobs .job"), HTTP,
             "the cards to go")
    wait_for(lambda: _request(server, "GET", f"/api/jobs/{job_id}").status == 404, HTTP,
             "the job to be deleted")


def test_the_page_is_self_contained(server):
    """The page and its two files come from the package, under a policy that loads nothing
    from anywhere else."""
    page = _request(server, "GET", "/")
    assert page.status == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in page.headers["content-security-policy"]
    assert "script-src 'self'" in page.headers["content-security-policy"]
    html = page.body.decode()
    assert "http://" not in html and "https://" not in html
    for name in ("app.js", "style.css"):
        static = _request(server, "GET", f"/static/{name}")
        assert static.status == 200 and b"https://" not in static.body
        source = Path(__file__).parents[3] / "bsmamba2_jax/serve/static" / name
        assert static.body == source.read_bytes()
