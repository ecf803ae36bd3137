"""What the three training scripts promise alike: the same seed gives the same run whatever the logging and
evaluation settings, the console shows every evaluation and a closing summary, user mistakes get a one- or two-line
error without a traceback, and --load-model finds its own dataset."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import datasets as D
from tests.conftest import ROOT, run_script

SCRIPTS = ("iql.py", "cql.py", "bcq.py")
# The settings that used to leak into training: IQL's diagnostics ran the actor with dropout on, CQL with
# --cql-alpha 0 drew proposals on logging steps only, BCQ's evaluation and diagnostics drew VAE samples.
EXTRA = {"iql.py": ["--actor-dropout", "0.1"], "cql.py": ["--cql-alpha", "0"], "bcq.py": []}


def scalars(run_dir: Path, prefix: str) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir)).Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"] if tag.startswith(prefix)}


def fail(script: str, *flags: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run a script that must refuse its input; check the refusal is short, clean and non-zero."""
    proc = subprocess.run([sys.executable, str(ROOT / script), *flags], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode != 0, proc.stdout
    assert "Traceback" not in proc.stderr, proc.stderr
    assert f"{script}: error: " in proc.stderr and len(proc.stderr.strip().splitlines()) <= 2, proc.stderr
    return proc


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("dataset", ["pendulum-medium", "cartpole-medium"])  # Box and Discrete
def test_same_seed_same_losses_whatever_the_logging_and_evaluation(tmp_path, script, dataset):
    common = ["--dataset", dataset, "--total-steps", "40", "--batch-size", "32", "--seed", "3", *EXTRA[script]]
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    out = run_script(script, *common, "--log-every", "10", "--eval-every", "20", "--eval-episodes", "2", cwd=a)
    run_script(script, *common, "--log-every", "20", "--eval-every", "30", "--eval-episodes", "1", cwd=b)
    la, lb = (scalars(next((d / "runs").iterdir()), "losses/") for d in (a, b))
    assert la.keys() == lb.keys() and la
    for tag in la:
        assert set(lb[tag]) == {20, 30, 40}  # every log step and every evaluation step
        for step in (20, 40):
            assert la[tag][step] == lb[tag][step], (tag, step)  # bit-identical, not approximately equal
    # the same run also shows the new evaluation tags and the console contract
    evals = scalars(next((a / "runs").iterdir()), "eval/")
    for tag in ("eval/return", "eval/normalized_score", "eval/discounted_return", "eval/q_start"):
        assert set(evals[tag]) == {20, 40}, tag
    assert all(np.isfinite(v) for v in evals["eval/q_start"].values())
    lines = out.splitlines()
    step20 = next(line for line in lines if line.startswith("step       20/40"))
    assert "eval normalized" in step20 and "at step" not in step20  # the evaluation is on its own step's line
    step30 = next(line for line in lines if line.startswith("step       30/40"))
    assert "at step 20" in step30
    summary = lines[-1]
    assert summary.startswith(f"{script}: done, 40 steps in") and "final normalized" in summary
    assert "best normalized" in summary and "run runs/" in summary and "model not saved" in summary


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS)
def test_load_model_uses_the_checkpoints_dataset(tmp_path, script):
    run_script(script, "--dataset", "cartpole-medium", "--total-steps", "20", "--batch-size", "16",
               "--eval-episodes", "0", "--save-model", cwd=tmp_path)
    ckpt = next((tmp_path / "runs").glob(f"*/{script[:-3]}.pt"))
    out = run_script(script, "--load-model", str(ckpt), "--eval-episodes", "1", cwd=tmp_path)
    # not the default Box dataset, which would crash in gymnasium
    assert "on cartpole-medium over 1 episodes: normalized" in out
    # a dataset of another environment is refused in one line, not a tensor-size error or gymnasium's IndexError
    for other, spaces in (("lunarlander-medium", "8-d observations, 4 actions"),
                          ("pendulum-medium", "3-d observations, 1-d actions")):
        D.load_dataset(other)  # generated here, so that the refusal is all the script prints on stderr
        err = fail(script, "--load-model", str(ckpt), "--dataset", other, cwd=tmp_path).stderr
        assert f"was trained on cartpole-medium (4-d observations, 2 actions); {other} has {spaces}" in err


# runs a script whose evaluation fails (a bug, an environment that crashes): the trained model must be saved first
BROKEN_EVALUATION = """
import runpy, sys
import common
def evaluate(*args, **kwargs):
    raise RuntimeError("evaluation failed")
common.evaluate = evaluate
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS)
def test_the_model_is_saved_before_the_last_evaluation_and_a_dataset_without_env_fails_at_start(tmp_path, script):
    proc = subprocess.run([sys.executable, "-c", BROKEN_EVALUATION, str(ROOT / script), "--dataset", "cartpole-medium",
                           "--total-steps", "10", "--batch-size", "8", "--eval-every", "100",
                           "--save-model"], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
    assert "evaluation failed" in proc.stderr and proc.returncode != 0
    assert len(list((tmp_path / "runs").glob(f"*/{script[:-3]}.pt"))) == 1
    # an .npz without env_id: refused before training when evaluation is on, trained when it is off
    ds = D.generate_builtin("cartpole-medium", 500)
    ds.env_id = None
    D.save_npz(ds, tmp_path / "bare.npz")
    err = fail(script, "--dataset", str(tmp_path / "bare.npz"), "--total-steps", "10", cwd=tmp_path).stderr
    assert "no environment to evaluate in; pass --eval-episodes 0" in err and "step" not in err
    run_script(script, "--dataset", str(tmp_path / "bare.npz"), "--total-steps", "10", "--batch-size", "8",
               "--eval-episodes", "0", cwd=tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS)
def test_user_errors_are_one_or_two_lines_without_a_traceback(tmp_path, script):
    fail(script, "--discount", "1.5", cwd=tmp_path)
    assert "must lie in [1, inf)" in fail(script, "--total-steps", "0", cwd=tmp_path).stderr
    (tmp_path / "a_folder").mkdir()
    assert "is a folder" in fail(script, "--load-model", "a_folder", cwd=tmp_path).stderr
    fail(script, "--tau", "0", cwd=tmp_path)
    fail(script, "--dataset", "lunarlander-hard", cwd=tmp_path)
    fail(script, "--load-model", "missing.pt", cwd=tmp_path)
    (tmp_path / "corrupt.pt").write_text("not a checkpoint")
    fail(script, "--load-model", "corrupt.pt", cwd=tmp_path)
    if not torch.cuda.is_available():
        fail(script, "--device", "cuda", cwd=tmp_path)
    fail(script, "--device", "tpu", cwd=tmp_path)


@pytest.mark.slow
def test_script_specific_ranges_and_a_batch_larger_than_the_data(tmp_path):
    proc = fail("bcq.py", "--dataset", "cartpole-medium", "--bcq-threshold", "1", cwd=tmp_path)
    assert "--bcq-threshold 1.0 is out of range: it must lie in [0, 1)" in proc.stderr
    assert "--expectile" in fail("iql.py", "--expectile", "1", cwd=tmp_path).stderr
    assert "--cql-alpha" in fail("cql.py", "--cql-alpha", "-1", cwd=tmp_path).stderr
    ds = D.generate_builtin("cartpole-medium", 500)
    D.save_npz(ds, tmp_path / "tiny.npz")
    proc = fail("iql.py", "--dataset", str(tmp_path / "tiny.npz"), "--batch-size", str(len(ds) + 1), cwd=tmp_path)
    assert f"--batch-size {len(ds) + 1} is out of range: it must lie in [1, {len(ds)}]" in proc.stderr


@pytest.mark.slow
def test_a_checkpoint_of_another_script_says_which_script_loads_it(tmp_path):
    run_script("iql.py", "--dataset", "cartpole-medium", "--total-steps", "5", "--batch-size", "16",
               "--eval-episodes", "0", "--save-model", cwd=tmp_path)
    ckpt = next((tmp_path / "runs").glob("*/iql.pt"))
    assert "python iql.py --load-model" in fail("cql.py", "--load-model", str(ckpt), cwd=tmp_path).stderr


@pytest.mark.slow
def test_n_by_1_rewards_train_like_the_flat_ones(tmp_path):
    ds = D.generate_builtin("cartpole-medium", 2000)
    D.save_npz(ds, tmp_path / "flat.npz")
    arrays = {k: getattr(ds, k) for k in D.ARRAY_KEYS}
    arrays["rewards"], arrays["terminals"] = ds.rewards[:, None], ds.terminals[:, None]  # the CQL authors' layout
    np.savez(tmp_path / "column.npz", **arrays, env_id=np.asarray(ds.env_id), env_kwargs=np.asarray("{}"),
             ref_min_score=np.asarray(ds.ref_min_score), ref_max_score=np.asarray(ds.ref_max_score))
    losses = []
    for name in ("flat", "column"):
        d = tmp_path / name
        d.mkdir()
        out = run_script("iql.py", "--dataset", str(tmp_path / f"{name}.npz"), "--total-steps", "20",
                         "--batch-size", "16", "--log-every", "20", "--eval-episodes", "0", cwd=d)
        losses.append(scalars(next((d / "runs").iterdir()), "losses/"))
    assert "rewards has shape (2" in out and "using it as" in out
    assert losses[0] == losses[1]  # no (B, B) broadcast: the same losses as the (N,) file
