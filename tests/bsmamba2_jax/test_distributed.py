"""Two CPU processes (jax.distributed + gloo) train like one process; their checkpoint restores
in a single process.

Both processes run `train.py` with --num_processes=2 on the tiny config, one CPU device each,
data-parallel over the global batch; each process reads half of every global batch.
"""

from __future__ import annotations

import re
import socket
import subprocess
import sys

import numpy as np
import pytest

from bsmamba2_jax.train.checkpoint import load_ema_params
from tests.bsmamba2_jax.test_train_loop import REPO, env, restore_numpy, train, train_cmd

# Adam eps 1e-3: see sharded_step_check.py (the two runs sum gradients in different orders).
EXTRA = ("--config.optim.eps=1e-3",)


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
    return tmp_path_factory.getbasetemp() / "jax_cache_distributed"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_equal_one(tmp_path, synthetic_root, compile_cache):
    single, multi = tmp_path / "single", tmp_path / "multi"
    train(single, synthetic_root, 3, compile_cache, *EXTRA)

    port = free_port()
    e = {**env(compile_cache), "XLA_FLAGS": ""}  # one CPU device per process
    procs = [subprocess.Popen(
        train_cmd(multi, synthetic_root, 3, *EXTRA, f"--coordinator_address=127.0.0.1:{port}",
                  "--num_processes=2", f"--process_id={i}"),
        cwd=REPO, env=e, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
        for i in range(2)]
    logs = []
    for p in procs:
        _, err = p.communicate(timeout=900)
        logs.append(err)
    for p, log in zip(procs, logs, strict=True):
        assert p.returncode == 0, log[-4000:]
    assert "'data': 2" in logs[0] and "2 processes" in logs[0]

    # Both processes hold the same params at the end.
    digests = [re.search(r"process (\d) params digest (\w+)", log).groups() for log in logs]
    assert {d[0] for d in digests} == {"0", "1"}
    assert digests[0][1] == digests[1][1]
    # Each wrote its own data-iterator state.
    assert sorted(p.name for p in (multi / "checkpoints/3/data_iter").glob("process_*")) == [
        "process_0-of-2.json", "process_1-of-2.json"]

    # Same global batches (examples 0..3, split 0,2 | 1,3 between processes) -> same training.
    a = restore_numpy(single / "checkpoints" / "3", "train_state")
    b = restore_numpy(multi / "checkpoints" / "3", "train_state")
    assert int(a["step"]) == int(b["step"]) == 3
    for x, y in zip(_leaves(a["params"]), _leaves(b["params"]), strict=True):
        np.testing.assert_allclose(x, y, atol=1e-5, rtol=0)
    # Training did update the params: they differ from their EMA (0.9 p_init + 0.1 p_now).
    ema_single = _leaves(restore_numpy(single / "checkpoints" / "3", "ema_params"))
    assert any(np.max(np.abs(x - y)) > 1e-5
               for x, y in zip(_leaves(a["params"]), ema_single, strict=True))

    # The 2-process checkpoint restores in one process and training goes on.
    ema, config = load_ema_params(multi)
    assert len(_leaves(ema)) == len(_leaves(a["params"]))
    assert config.total_steps == 3
    log = train(multi, synthetic_root, 4, compile_cache, *EXTRA)
    assert "Resuming at step 3" in log and "data stream restarts" in log
    assert int(restore_numpy(multi / "checkpoints" / "4", "train_state")["step"]) == 4


def _leaves(tree) -> list[np.ndarray]:
    import jax

    return [np.asarray(x) for x in jax.tree.leaves(tree)]


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
