"""Checked audio reads: truncation (header vs data), short reads, NaN/Inf samples."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf

from bsmamba2_jax import audio_files


def _noise(path, frames, subtype, seed=0):
    audio = (0.1 * np.random.default_rng(seed).standard_normal((frames, 2))).astype(np.float32)
    sf.write(str(path), audio, 44100, subtype=subtype)
    return audio.T


@pytest.mark.parametrize("subtype", ["FLOAT", "PCM_16", "PCM_24"])
def test_header_frames_and_a_cut_file(tmp_path, subtype):
    path = tmp_path / "a.wav"
    audio = _noise(path, 12_345, subtype)
    assert audio_files.wav_header_frames(path) == 12_345
    got, rate = audio_files.read_checked(path)
    assert rate == 44100 and got.shape == (2, 12_345) and got.flags.c_contiguous
    np.testing.assert_allclose(got, audio, atol=2.0**-15)
    data = path.read_bytes()
    path.write_bytes(data[:len(data) - 1000])  # the header still promises every frame
    with pytest.raises(audio_files.AudioFileError,
                       match=rf"a\.wav: truncated: its header promises 12345 frames \(0\.28 s\) "
                             rf"but the file holds {sf.info(str(path)).frames}"):
        audio_files.read_checked(path)


def test_other_formats_and_unset_sizes_have_no_header_length(tmp_path):
    flac = tmp_path / "a.flac"
    _noise(flac, 1000, "PCM_16")
    assert audio_files.wav_header_frames(flac) is None
    audio_files.check_complete(flac, 10, 44100, "FLAC")  # only WAV states its length
    wav = tmp_path / "streamed.wav"
    _noise(wav, 1000, "PCM_16")
    data = bytearray(wav.read_bytes())
    at = data.index(b"data")
    data[at + 4:at + 8] = b"\xff\xff\xff\xff"  # a streaming writer's unknown size
    wav.write_bytes(bytes(data))
    assert audio_files.wav_header_frames(wav) is None


def test_nonfinite_samples_and_unreadable_files_are_named(tmp_path):
    path = tmp_path / "n.wav"
    audio = _noise(path, 5000, "FLOAT").copy()
    audio[1, 4410], audio[0, 4500] = np.nan, -np.inf
    sf.write(str(path), audio.T, 44100, subtype="FLOAT")
    with pytest.raises(audio_files.AudioFileError,
                       match=r"n\.wav: 2 non-finite sample\(s\) \(NaN or Inf\), the first at "
                             r"0\.100 s \(sample 4410\); repair the file"):
        audio_files.read_checked(path)
    bad = tmp_path / "b.wav"
    bad.write_bytes(b"RIFF not really")
    with pytest.raises(audio_files.AudioFileError, match=r"b\.wav: cannot read it as audio"):
        audio_files.read_checked(bad)
