"""The one check every writing command makes: never over an input, never into a run it reads."""

from __future__ import annotations

import pytest

from bsmamba2_jax.write_guard import OutputPathError, check_output, run_of


@pytest.fixture
def run(tmp_path):
    """A workdir laid out like train.py's (the files' contents do not matter here)."""
    run = tmp_path / "runs" / "demo"
    for step in ("checkpoints/12/ema_params", "checkpoints/18/train_state", "best_usdr/12/params"):
        (run / step).mkdir(parents=True)
    (run / "config.json").write_text("{}")
    (run / "metrics.jsonl").write_text("")
    return run


def test_run_of_finds_the_run_of_a_step_and_of_a_selection_folder(run, tmp_path):
    for inside in ("", "checkpoints", "checkpoints/12", "best_usdr/12/params"):
        assert run_of(run / inside) == run.resolve(), inside
    assert run_of(tmp_path / "runs") is None
    (run / "eval").mkdir()
    assert run_of(run / "eval") is None  # not part of what train.py reads
    lost = tmp_path / "lost"  # config.json deleted: the checkpoints still make it a run
    (lost / "checkpoints/3/ema_params").mkdir(parents=True)
    assert run_of(lost / "checkpoints/3") == lost.resolve()


@pytest.mark.parametrize("read,out,says", [
    ("", "config.json", "lies inside the train.py run"),
    ("", "metrics.jsonl", "lies inside the train.py run"),
    ("", "model.msgpack", "lies inside the train.py run"),
    ("checkpoints/12", "config.json", "lies inside the train.py run"),
    ("checkpoints/12", "checkpoints/12/model.msgpack", "lies inside the train.py run"),
    ("best_usdr", "best_usdr/model.msgpack", "lies inside the train.py run"),
    ("", ".", "lies inside the train.py run"),
    ("", "..", "holds the input"),
    ("checkpoints/12", "checkpoints", "lies inside the train.py run"),
])
def test_outputs_inside_a_run_that_is_read_are_refused(run, read, out, says):
    with pytest.raises(OutputPathError, match=f"OUT {run / out} {says}") as e:
        check_output(run / out, [run / read], name="OUT")
    assert "write outside it" in str(e.value) or "elsewhere" in str(e.value)


def test_no_output_lands_inside_any_run_even_one_not_read(run, tmp_path):
    model = tmp_path / "m.msgpack"
    model.write_bytes(b"weights")
    for out in ("config.json", "checkpoints/12/x", "model.msgpack"):
        with pytest.raises(OutputPathError, match=f"OUT {run / out} lies inside the train.py "
                                                  f"run {run}: its config"):
            check_output(run / out, [model], name="OUT")
    check_output(run / "eval/m.msgpack", [model])
    check_output(tmp_path / "runs/m.msgpack", [model])


def test_a_runs_eval_folder_and_places_beside_it_are_allowed(run):
    for out in ("eval/test/model.msgpack", "../demo.msgpack", "../demo-separated"):
        check_output(run / out, [run, run / "checkpoints/12"])


def test_an_output_that_is_an_input_by_any_name_is_refused(tmp_path):
    model = tmp_path / "m.msgpack"
    model.write_bytes(b"weights")
    (tmp_path / "hard.msgpack").hardlink_to(model)
    (tmp_path / "soft.msgpack").symlink_to(model)
    for out in (model, tmp_path / "hard.msgpack", tmp_path / "soft.msgpack",
                tmp_path / "sub/../m.msgpack"):
        with pytest.raises(OutputPathError, match="is the input .*never overwritten"):
            check_output(out, [model], name="OUT")
    check_output(tmp_path / "other.msgpack", [model, tmp_path / "missing.ckpt"])


def test_a_folder_output_holding_an_input_is_refused_unless_it_only_receives_entries(tmp_path):
    song = tmp_path / "music" / "song.wav"
    song.parent.mkdir()
    song.write_bytes(b"audio")
    with pytest.raises(OutputPathError, match="holds the input"):
        check_output(tmp_path / "music", [song], name="-o")
    check_output(tmp_path / "music", [song], name="-o", whole=False)


def test_a_plain_input_folder_is_protected_as_a_whole(tmp_path):
    folder = tmp_path / "exported"
    folder.mkdir()
    with pytest.raises(OutputPathError, match="lies inside the input folder .*what it reads"):
        check_output(folder / "x.msgpack", [folder])


def test_evaluate_never_writes_results_into_a_step_directory(run, tmp_path):
    """evaluate.py writes WORKDIR/eval/<split>/: fine for a run, refused for a step directory
    (or a folder holding a checkpoint that is scored), before any work."""
    from absl import app

    import evaluate

    with pytest.raises(app.UsageError, match=r"--workdir's results folder .*12/eval/test lies "
                                             rf"inside the train.py run {run}.*pass the run "
                                             "itself as --workdir"):
        evaluate.check_options(workdir=str(run / "checkpoints/12"))
    assert not (run / "checkpoints/12/eval").exists()
    assert evaluate.check_options(workdir=str(run)).workdir == run
    inside = tmp_path / "out/eval/test/m.msgpack"
    inside.parent.mkdir(parents=True)
    inside.write_bytes(b"weights")
    with pytest.raises(app.UsageError, match="holds the input"):
        evaluate.check_options(workdir=str(tmp_path / "out"), checkpoints=[str(inside)])
