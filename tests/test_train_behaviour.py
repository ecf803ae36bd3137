"""tools/train_behaviour.py: tiny SAC runs write snapshots that datasets.py loads, --resume continues from the
checkpoint, --export picks expert / medium / replay snapshots as D4RL did."""

import importlib.util
import json
import sys

import numpy as np
import pytest
import torch

import datasets as D
from tests.conftest import ROOT, run_script

spec = importlib.util.spec_from_file_location("train_behaviour", ROOT / "tools" / "train_behaviour.py")
TB = sys.modules["train_behaviour"] = importlib.util.module_from_spec(spec)  # a dataclass needs its module there
spec.loader.exec_module(TB)

TINY = ["--env", "hopper", "--learning-starts", "100", "--snapshot-every", "100", "--hidden", "32",
        "--batch-size", "32", "--eval-episodes", "2"]


def tiny_args(out, **kw) -> "TB.Args":
    base = dict(env="hopper", learning_starts=100, snapshot_every=100, hidden=32, batch_size=32, eval_episodes=2,
                out_dir=str(out))
    return TB.Args(**{**base, **kw})


def eval_log(out) -> list[dict]:
    return [json.loads(line) for line in (out / "eval.jsonl").read_text().splitlines()]


def test_a_short_run_writes_snapshots_that_datasets_loads_and_exports(tmp_path, monkeypatch):
    out, bp = tmp_path / "run", tmp_path / "bp"
    stdout = run_script("tools/train_behaviour.py", *TINY, "--total-steps", "300", "--checkpoint-every", "150",
                        "--out-dir", str(out), cwd=tmp_path)
    assert "done: 300 steps" in stdout and "--export" in stdout.splitlines()[-1]
    assert sorted(p.name for p in (out / "snapshots").iterdir()) == [f"hopper-{s:07d}.pt" for s in (100, 200, 300)]
    log = eval_log(out)
    assert [e["step"] for e in log] == [100, 200, 300]
    assert set(log[0]) == {"step", "eval_return_mean", "eval_return_std", "wall_s"}
    # a snapshot is a behaviour policy file: datasets.py loads it, with its metadata
    monkeypatch.setenv("OFFLINE_RL_BEHAVIOUR", str(out / "snapshots"))
    actor, meta = D.load_behaviour_policy("hopper", "hopper-0000200")
    assert meta["env_id"] == "Hopper-v5" and meta["train_env_steps"] == 200 and meta["seed"] == 0
    assert meta["eval_return_mean"] == pytest.approx(log[1]["eval_return_mean"])
    assert isinstance(actor, D.SquashedGaussianActor)
    # export: the last snapshot is the expert; medium must lie after learning_starts (here only step 200 does)
    TB.main(tiny_args(out, export=True, behaviour_dir=str(bp)))
    assert sorted(p.name for p in bp.iterdir()) == ["hopper-expert.pt", "hopper-medium.pt", "hopper-replay-0000100.pt"]
    monkeypatch.setenv("OFFLINE_RL_BEHAVIOUR", str(bp))
    expert, expert_meta = D.load_behaviour_policy("hopper", "hopper-expert")
    snap = torch.load(out / "snapshots" / "hopper-0000300.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(v, snap[k]) for k, v in expert.state_dict().items())
    assert expert_meta["role"] == "expert"
    assert D.load_behaviour_policy("hopper", "hopper-medium")[1]["replay_steps"] == [100]
    ds = D.generate_builtin("hopper-medium-replay")  # 100 uniform steps, then the step-100 snapshot for 100 steps
    assert len(ds) == 200 and (ds.behavior_log_probs == np.float32(-3 * np.log(2.0))).sum() == 100


def test_resume_continues_from_the_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    TB.main(tiny_args(out, total_steps=200, checkpoint_every=100))
    first = eval_log(out)
    # resuming a finished run at its own length retrains nothing: the restored actor gives the same snapshot
    TB.main(tiny_args(out, total_steps=200, resume=True))
    assert eval_log(out)[-1]["eval_return_mean"] == first[-1]["eval_return_mean"]
    assert "at step 200 (replay buffer 200 transitions)" in capsys.readouterr().out
    before = torch.load(out / "checkpoint.pt", weights_only=True)
    assert before["step"] == 200 and len(before["buffer"]["rew"]) == 200
    TB.main(tiny_args(out, total_steps=300, resume=True, checkpoint_every=100))  # the buffer grows to 300 rows
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["step"] == 300 and len(state["buffer"]["rew"]) == 300 and state["buffer_pos"] == 0  # full ring
    for k, v in before["buffer"].items():  # the restored rows kept, the new ones appended after them
        assert torch.equal(state["buffer"][k][:200], v), k
    assert not torch.equal(state["buffer"]["obs"][200], state["buffer"]["obs"][0])
    assert [e["step"] for e in eval_log(out)] == [100, 200, 300]  # redone lines replace the old ones
    assert [e["eval_return_mean"] for e in eval_log(out)][:1] == [first[0]["eval_return_mean"]]
    assert not list(out.glob("*.tmp"))


def test_a_fresh_run_refuses_a_used_folder_and_resume_needs_a_checkpoint(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(D.UserError, match="no checkpoint"):
        TB.main(tiny_args(out, total_steps=150, resume=True))
    TB.main(tiny_args(out, total_steps=150, checkpoint_every=0))
    with pytest.raises(D.UserError, match="already holds a run: continue it with --resume"):
        TB.main(tiny_args(out, total_steps=150))


def test_export_picks_the_snapshot_closest_to_a_third_of_the_expert_as_medium(tmp_path):
    out, bp = tmp_path / "run", tmp_path / "bp"
    for step, ret in [(100, 10.0), (200, 50.0), (300, 120.0), (400, 200.0), (500, 300.0)]:
        D.save_behaviour_policy(out / "snapshots" / f"hopper-{step:07d}.pt", D.SquashedGaussianActor(11, 3, 8),
                                env_id="Hopper-v5", train_env_steps=step, eval_return_mean=ret, eval_return_std=0.0,
                                seed=0, learning_starts=100)
    (bp / "hopper-replay-0000700.pt").parent.mkdir()
    (bp / "hopper-replay-0000700.pt").write_bytes(b"stale")  # from an earlier export: removed
    TB.main(tiny_args(out, export=True, behaviour_dir=str(bp)))
    metas = {p.name: torch.load(p, weights_only=True) for p in bp.iterdir()}
    assert sorted(metas) == ["hopper-expert.pt", "hopper-medium.pt", "hopper-replay-0000100.pt",
                             "hopper-replay-0000200.pt"]
    assert metas["hopper-expert.pt"]["train_env_steps"] == 500
    assert metas["hopper-medium.pt"]["train_env_steps"] == 300  # |120 - 300/3| = 20 beats |50 - 100| = 50
    assert metas["hopper-medium.pt"]["replay_steps"] == [100, 200]
