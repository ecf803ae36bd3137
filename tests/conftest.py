"""Shared test set-up: one CPU thread per process, and every test (and every subprocess it starts) caches built-in
datasets in one temporary folder for the whole session, so each dataset is generated at most once per test run."""

import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# one CPU thread in the test process and in every script it starts, as the scripts' --threads 1 default: with
# torch's default (all cores) the tests slow down several-fold on a machine that is busy with anything else
os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(1)


@pytest.fixture(scope="session", autouse=True)
def dataset_cache(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("offline-rl-data")
    old = os.environ.get("OFFLINE_RL_DATA")
    os.environ["OFFLINE_RL_DATA"] = str(path)
    yield path
    if old is None:
        os.environ.pop("OFFLINE_RL_DATA", None)
    else:
        os.environ["OFFLINE_RL_DATA"] = old


def run_script(script: str, *flags: str, cwd: Path, timeout: int = 300, env_root: Path = ROOT) -> str:
    """Run `python {script} {flags}` from the project root (or `env_root`, a folder holding a copy) in `cwd` (so
    runs/ lands there); return stdout, failing the test with the script's stderr when it exits non-zero."""
    import subprocess

    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("PYTHONPATH", None)  # a copied script must find common.py next to itself, not the project's
    proc = subprocess.run([sys.executable, str(env_root / script), *flags], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, f"{script} {' '.join(flags)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


class Member:
    """Member i of a QEnsemble with n_layers = 0 seen as the nn.Linear it replaces: weight (out, in), bias (out,)
    (views into the stacked parameters, so writing them sets the member). Used by the IQL and CQL tests."""

    def __init__(self, ensemble, i: int):
        self.ensemble, self.i = ensemble, i

    @property
    def weight(self):
        return self.ensemble.weights[0][self.i].T

    @property
    def bias(self):
        return self.ensemble.biases[0][self.i, 0]
