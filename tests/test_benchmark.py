"""The benchmark runner skips finished runs and the aggregator turns its logs into a table and a picture."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import ROOT


def test_runner_skips_finished_runs_and_aggregator_writes_the_table(tmp_path):
    # d3rlpy is not installed here: a stand-in interpreter answers like d3rlpy_run.py does for discrete IQL
    fake = tmp_path / "fake-d3rlpy-python"
    fake.write_text("#!/bin/sh\necho 'd3rlpy has no discrete IQL'\nexit 3\n")
    fake.chmod(0o755)
    cmd = [sys.executable, str(ROOT / "benchmark" / "run.py"), "--algos", "iql", "--datasets", "cartpole-medium",
           "--seeds", "1", "--total-steps", "60", "--eval-every", "30", "--eval-episodes", "1", "--workers", "1",
           "--tag", "t", "--results-dir", str(tmp_path), "--extra", "iql:--batch-size 16 --log-every 30",
           "--with-d3rlpy", "--d3rlpy-python", str(fake)]
    first = subprocess.run(cmd + ["--status-every", "0.005"], capture_output=True, text=True, timeout=300)
    assert first.returncode == 0 and "done iql__cartpole-medium__1" in first.stdout, first.stdout + first.stderr
    # progress: runs done / total with an ETA as each run ends, and what is running while none ends
    assert "[1/2 runs, " in first.stdout and "ETA ~" in first.stdout and "[2/2 runs, " in first.stdout, first.stdout
    assert "running: iql__cartpole-medium__1 (" in first.stdout, first.stdout
    done = json.loads((tmp_path / "t" / "done" / "iql__cartpole-medium__1.json").read_text())
    assert done["algo"] == "iql" and "--batch-size 16" in done["cmd"]
    assert "n/a  d3rlpy_iql__cartpole-medium__1" in first.stdout  # reported, not a failure, and not redone
    na = json.loads((tmp_path / "t" / "done" / "d3rlpy_iql__cartpole-medium__1.json").read_text())
    assert na["not_available"] == "d3rlpy has no discrete IQL" and "--algo iql" in na["cmd"]
    second = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert "skip iql__cartpole-medium__1 (done)" in second.stdout  # a finished run is not redone
    assert "skip d3rlpy_iql__cartpole-medium__1 (done)" in second.stdout

    agg = subprocess.run([sys.executable, str(ROOT / "benchmark" / "aggregate.py"), str(tmp_path / "t")],
                         capture_output=True, text=True, timeout=300)
    assert agg.returncode == 0, agg.stderr
    table = (tmp_path / "t" / "results.md").read_text()
    assert "| cartpole-medium | 39.1 |" in table and "(n=1, 60 steps)" in table  # the data's own score, 1 seed
    assert (tmp_path / "t" / "curves.png").stat().st_size > 10_000
    (run,) = json.loads((tmp_path / "t" / "scores.json").read_text())
    assert run["algo"] == "iql" and run["steps"] == [30, 60] and len(run["score"]) == 2


def test_extra_flags_can_target_one_action_space():
    sys.path.insert(0, str(ROOT / "benchmark"))
    from run import PRESETS, extra_flags

    extra = {"iql": ["--log-every", "10"], "iql@discrete": ["--beta", "0.3"], "cql@box": ["--cql-alpha", "10"]}
    assert extra_flags(extra, "iql", "lunarlander-medium") == ["--log-every", "10", "--beta", "0.3"]
    assert extra_flags(extra, "iql", "lunarlander-continuous-medium") == ["--log-every", "10"]
    assert extra_flags(extra, "cql", "pendulum-medium") == ["--cql-alpha", "10"]
    assert extra_flags(extra, "cql", "cartpole-medium") == [] and extra_flags(extra, "bcq", "pendulum-medium") == []
    assert extra_flags(PRESETS["small"]["extra"], "iql", "cartpole-medium") == ["--beta", "0.3"]
    # MuJoCo and Minari datasets are Box: the discrete IQL beta is not theirs
    for box in ("hopper-medium", "halfcheetah-medium-expert", "mujoco/hopper/medium-v0", "data.npz"):
        assert extra_flags(PRESETS["small"]["extra"], "iql", box) == [], box


def test_bc_runs_iql_with_beta_zero_and_presets_can_skip_an_action_space():
    sys.path.insert(0, str(ROOT / "benchmark"))
    from run import ALIASES, PRESETS, extra_flags, job_list

    assert ALIASES["bc"] == ("iql", ["--beta", "0"])
    jobs = job_list(dict(PRESETS["choosing"], seeds=[1], datasets=["pendulum-medium", "lunarlander-medium"]))
    assert ("cql", "lunarlander-medium", 1) in jobs and ("cql", "pendulum-medium", 1) not in jobs
    assert len(jobs) == 7 and ("bc", "pendulum-medium", 1) in jobs
    # fine-tuning: Cal-QL and the from-scratch baseline are cql_finetune.py; the baseline's --total-steps 0 comes
    # after the runner's --total-steps (the last value wins), Box CQL / Cal-QL are left out
    assert ALIASES["calql"] == ("cql_finetune", ["--cal-ql"]) and ALIASES["scratch"][0] == "cql_finetune"
    ft = PRESETS["finetune"]
    assert extra_flags(ft["extra"], "scratch", "lunarlander-medium")[-2:] == ["--total-steps", "0"]
    assert extra_flags(ft["extra"], "iql", "lunarlander-medium") == ["--online-steps", "50000", "--beta", "0.3"]
    ft_jobs = job_list(dict(ft, seeds=[1]))
    assert ("calql", "lunarlander-medium", 1) in ft_jobs
    assert ("calql", "lunarlander-continuous-medium", 1) not in ft_jobs
    assert ("scratch", "lunarlander-continuous-medium", 1) in ft_jobs and len(ft_jobs) == 6
    # on a GPU the combinations skipped for their CPU cost run
    gpu_jobs = job_list(dict(ft, seeds=[1], device="cuda"))
    assert ("calql", "lunarlander-continuous-medium", 1) in gpu_jobs and len(gpu_jobs) == 8


def test_mujoco_runs_save_their_policies_and_start_from_the_beginning():
    sys.path.insert(0, str(ROOT / "benchmark"))
    from run import PRESETS, command

    cfg = dict(PRESETS["mujoco"], tag="mujoco", device="cpu", d3rlpy_python="python")
    cmd = command("bcq", "hopper-medium", 1, cfg)
    assert cmd[1] == str(ROOT / "bcq.py") and "--dataset" in cmd
    assert " ".join(cmd).endswith("--exp-name bcq-mujoco --save-model --checkpoint-every 50000")
    assert not any("resume" in arg for arg in cmd)
    d3 = command("d3rlpy_bcq", "hopper-medium", 1, cfg)
    assert d3[:4] == ["python", str(ROOT / "benchmark" / "d3rlpy_run.py"), "--algo", "bcq"]
    assert " ".join(d3).endswith("--exp-name d3rlpy_bcq-mujoco") and not any("resume" in arg for arg in d3)
    assert " ".join(command("d3rlpy_iql", "hopper-medium", 1, cfg)).endswith("--reward-scaling return-range")


def test_finetune_runs_are_the_finetuning_scripts_with_the_flags_of_the_committed_results():
    sys.path.insert(0, str(ROOT / "benchmark"))
    from run import PRESETS, command, job_list

    # iql / cql -> iql_finetune.py / cql_finetune.py, calql and scratch -> cql_finetune.py; every other flag as the
    # runs of benchmark/results/finetune were started (then by iql.py / cql.py), in the same order, less the
    # --save-model --checkpoint-every N that two of them had on top (saving files changes no number)
    cfg = dict(PRESETS["finetune"], tag="finetune", device="cpu", d3rlpy_python="python")
    script = {"iql": "iql_finetune.py", "cql": "cql_finetune.py", "calql": "cql_finetune.py",
              "scratch": "cql_finetune.py"}
    committed, compared = ROOT / "benchmark" / "results" / "finetune" / "done", 0
    for algo, dataset, seed in job_list(cfg):
        cmd = command(algo, dataset, seed, cfg)
        assert cmd[:2] == [sys.executable, str(ROOT / script[algo])], cmd
        marker = committed / f"{algo}__{dataset}__{seed}.json"
        if marker.exists():
            flags = json.loads(marker.read_text())["cmd"].split()[1:]
            if "--checkpoint-every" in flags:
                at = flags.index("--checkpoint-every")
                flags = flags[:at] + flags[at + 2:]
            assert cmd[2:] == [f for f in flags if f != "--save-model"], (algo, dataset, seed)
            compared += 1
    assert compared == len(job_list(cfg)) == 18  # every run of the table
    assert "--cal-ql" in command("calql", "lunarlander-medium", 1, cfg)
    # outside the finetune preset, iql and cql are the offline scripts
    assert command("iql", "lunarlander-medium", 1, dict(cfg, scripts={}))[1] == str(ROOT / "iql.py")
    small = dict(PRESETS["small"], tag="small", device="cpu", d3rlpy_python="python")
    assert command("cql", "lunarlander-medium", 1, small)[1] == str(ROOT / "cql.py")
    assert command("bc", "lunarlander-medium", 1, small)[1] == str(ROOT / "iql.py")


def test_config_json_lists_the_runs_of_every_command_into_the_folder():
    sys.path.insert(0, str(ROOT / "benchmark"))
    from run import folder_config

    first = dict(algos=["iql"], datasets=["hopper-medium"], seeds=[1], total_steps=300, extra={"iql": ["-a"]})
    second = dict(first, algos=["bcq", "iql"], datasets=["walker2d-medium"], extra={"bcq": ["-b"]})
    cfg = folder_config(second, folder_config(first, {}))
    assert cfg["algos"] == ["iql", "bcq"] and cfg["datasets"] == ["hopper-medium", "walker2d-medium"]
    assert cfg["seeds"] == [1] and cfg["extra"] == {"iql": ["-a"], "bcq": ["-b"]} and cfg["total_steps"] == 300
    assert folder_config(dict(second, extra={"iql": ["-c"]}), cfg)["extra"]["iql"] == ["-c"]  # the latest flags


def test_longest_runs_start_first_and_the_wall_time_estimate_packs_them():
    sys.path.insert(0, str(ROOT / "benchmark"))
    from run import expected_seconds, schedule

    assert schedule([3, 2, 2, 1], workers=2) == 4  # slots: 3+1 and 2+2
    assert schedule([1, 2, 2, 3], workers=2) == 5  # shortest first leaves the 3 to run alone at the end
    assert schedule([5], workers=4) == 5
    # Box CQL (30 sampled actions per state) is the slowest run; discrete BCQ the fastest
    costs = {a: expected_seconds(a, d, 1000) for a, d in [("cql", "pendulum-medium"), ("bcq", "cartpole-medium"),
                                                            ("iql", "lunarlander-medium")]}
    assert max(costs, key=costs.get) == "cql" and min(costs, key=costs.get) == "bcq"
    assert expected_seconds("iql", "cartpole-medium", 2000) == 2 * expected_seconds("iql", "cartpole-medium", 1000)
    # fine-tuning runs: the online steps (x --utd) count, and a --total-steps among the extra flags overrides
    d = "lunarlander-medium"
    assert expected_seconds("iql", d, 20000, ["--online-steps", "50000"]) == expected_seconds("iql", d, 70000)
    assert expected_seconds("iql", d, 0, ["--online-steps", "1000", "--utd", "3"]) == expected_seconds("iql", d, 3000)
    scratch = ["--online-steps", "50000", "--total-steps", "0"]
    assert expected_seconds("scratch", d, 20000, scratch) == expected_seconds("scratch", d, 50000) > 0


def test_eta_scales_the_expected_costs_by_how_fast_the_finished_runs_went():
    sys.path.insert(0, str(ROOT / "benchmark"))
    from run import eta_seconds

    assert eta_seconds([], [], [], workers=2) == 0.0
    assert eta_seconds([], [(100, 30, None)], [50, 50], workers=2) == 100  # no run finished yet: the costs as they are
    # the finished runs took twice their expected cost: 200 - 30 left on the running one, 100 + 100 queued
    assert eta_seconds([(10, 20)], [(100, 30, None)], [50, 50], workers=2) == 200
    assert eta_seconds([(10, 5)], [(100, 80, None)], [], workers=1) == 0  # overdue, and no ETA of its own
    # a run whose console printed an ETA: that one, as it is (an overdue run still has time left)
    assert eta_seconds([(10, 5)], [(100, 80, 300.0)], [], workers=1) == 300
    assert eta_seconds([(10, 20)], [(100, 30, 60.0)], [50, 50], workers=2) == 160  # 60 + 100 on one slot, 100


def test_the_eta_of_a_running_run_is_the_last_one_its_console_printed(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmark"))
    from run import logged_eta

    log = tmp_path / "run.log"
    assert logged_eta(log) is None  # not started yet
    log.write_text("loading dataset hopper-medium ...\n")
    assert logged_eta(log) is None  # no progress line yet
    log.write_text("x" * 5000 + "\nstep  1000/300000 |  80 SPS | ETA   62.3 min | no eval yet\n"
                   "step  2000/300000 |  85 SPS | ETA   58.5 min | no eval yet | q_data 1.0\n")
    assert logged_eta(log) == 58.5 * 60


def test_aggregator_leaves_out_unfinished_runs_and_keeps_a_redone_seed_once(capsys):
    sys.path.insert(0, str(ROOT / "benchmark"))
    from aggregate import finished

    def run(seed, last_step):
        return dict(dataset="d", algo="cql", seed=seed, steps=np.arange(1000, last_step + 1, 1000))

    # seed 1 was killed at 2k and redone to 5k; seed 2 is still running at 3k; seed 3 finished
    kept = finished([run(1, 2000), run(1, 5000), run(2, 3000), run(3, 5000)])
    assert sorted((r["seed"], int(r["steps"][-1])) for r in kept) == [(1, 5000), (3, 5000)]
    assert "seed 2: last evaluation at step 3000 of 5000" in capsys.readouterr().out


def test_aggregating_again_without_the_logs_keeps_the_runs_scores_json_recorded(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmark"))
    from aggregate import main
    from torch.utils.tensorboard import SummaryWriter

    def log(name, scores, sps):
        with SummaryWriter(str(tmp_path / "runs" / name)) as w:
            for step, score in zip((10, 20), scores):
                w.add_scalar("eval/normalized_score", score, step)
                w.add_scalar("charts/SPS", sps, step)

    # bcq was aggregated on another machine before scores.json kept speeds; its logs are not here
    old = [dict(algo="bcq", dataset="d", seed=1, steps=[10, 20], score=[1.0, 2.0]),
           dict(algo="iql", dataset="d", seed=1, steps=[10, 20], score=[3.0, 4.0], sps=50.0, wall_s=60)]
    (tmp_path / "scores.json").write_text(json.dumps(old))
    log("d__iql-t__1__5", [5.0, 6.0], 70.0)  # the same run logged here: its logs win
    log("d__cql-t__2__5", [7.0, 8.0], 30.0)
    main(tmp_path)
    first = (tmp_path / "results.md").read_text()
    assert "| d | nan | 2.0 ± 0.0 (n=1, 20 steps) | 2.0 ± 0.0 | 8.0 ± 0.0 (n=1, 20 steps) | 8.0 ± 0.0 | " \
           "6.0 ± 0.0 (n=1, 20 steps) | 6.0 ± 0.0 |" in first, first
    assert "| iql | Box | 70 | 1 |" in first and "before it kept speeds): 1." in first, first
    recorded = {r["algo"]: r for r in json.loads((tmp_path / "scores.json").read_text())}
    assert recorded["bcq"]["sps"] is None and recorded["cql"]["sps"] == 30.0 and recorded["iql"]["score"] == [5, 6]

    # a fresh clone: no logs at all, and the same table comes back from scores.json alone
    shutil.rmtree(tmp_path / "runs")
    main(tmp_path)
    assert (tmp_path / "results.md").read_text() == first


D3RLPY_PYTHON = ROOT / ".venv-d3rlpy" / "bin" / "python"


@pytest.mark.slow
@pytest.mark.skipif(not D3RLPY_PYTHON.exists(), reason="needs .venv-d3rlpy (benchmark/requirements-d3rlpy.txt)")
def test_a_d3rlpy_run_logs_what_the_aggregator_reads(tmp_path):
    flags = ["--algo", "iql", "--dataset", "pendulum-medium", "--total-steps", "40", "--eval-every", "10",
             "--eval-episodes", "1", "--reward-scaling", "return-range"]
    script = str(ROOT / "benchmark" / "d3rlpy_run.py")
    env = {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    whole = subprocess.run([str(D3RLPY_PYTHON), script, *flags], cwd=tmp_path, env=env, capture_output=True,
                           text=True)
    assert whole.returncode == 0, whole.stderr
    assert "step       30/40" in whole.stdout and "| ETA " in whole.stdout  # our scripts' progress lines
    assert "model not saved (d3rlpy_run.py keeps no policy)" in whole.stdout.splitlines()[-1]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (run,) = (tmp_path / "runs").iterdir()
    assert run.name.startswith("pendulum-medium__d3rlpy_iql__1__")
    ea = EventAccumulator(str(run)).Reload()
    for tag in ("eval/return", "eval/normalized_score", "charts/SPS"):
        assert [e.step for e in ea.Scalars(tag)] == [10, 20, 30, 40], tag
