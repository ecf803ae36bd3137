"""Run {algorithms} x {datasets} x {seeds} in parallel processes; a finished run is not redone.

    python benchmark/run.py --preset small               # the small preset (see PRESETS below)
    python benchmark/run.py --algos iql --datasets lunarlander-medium --seeds 1 2 3 --total-steps 20000
    python benchmark/run.py --preset small --with-d3rlpy # and each run with d3rlpy (its own venv: README.md)
    python benchmark/run.py --preset small --ray auto    # each run a Ray task on the cluster (docs/benchmark.md)
    python benchmark/aggregate.py benchmark/results/small  # tables and learning curves

Each run is `python {algo}.py --dataset D --seed S --total-steps N --exp-name {algo}-{tag}` started in
`benchmark/results/{tag}/` (so its TensorBoard log lands in `benchmark/results/{tag}/runs/`), with one torch
thread per process (the finetune preset's runs are iql_finetune.py / cql_finetune.py: PRESETS' "scripts").
When a run exits cleanly the runner writes `done/{algo}__{dataset}__{seed}.json` (command, wall time); runs with
such a file are skipped next time, and a run stopped part-way starts again from the beginning. A progress line
(runs done / total, elapsed, ETA) is printed as each run ends, and every --status-every minutes while none does.

With `--ray [ADDRESS]` each run is a Ray task instead (one CPU, --gpus-per-run GPUs) on a cluster joined at ADDRESS
(`auto`, `ray://host:10001`, `host:port`; none: a local one started here). The task runs the same command in a
temporary folder of its worker node, with the node's copy of the project (Ray's working_dir), and sends back the
run's console output and every file it wrote (TensorBoard log, saved models); this runner writes them where the
local runs would be, so skips, done markers, progress and aggregate.py work as they do without Ray. A task whose
node dies is rerun (RAY_RETRIES); runs are seeded, so the rerun is the same run (docs/benchmark.md).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
D3RLPY_NOT_AVAILABLE = 3  # d3rlpy_run.py's exit status when d3rlpy lacks the variant (e.g. discrete IQL)
RAY_RETRIES = 3  # --ray: how many times a run whose worker node (or worker process) died is started again
# --ray: what the worker nodes need not receive of the project (Ray also leaves out what .gitignore lists)
RAY_EXCLUDES = [".git", ".venv*", ".ci-venv", "runs", "benchmark/results", "docs"]

# IQL's beta = 3 is the paper's MuJoCo value; the discrete LunarLander data needs 0.3 (docs/iql.md explains)
DISCRETE_IQL_BETA = {"iql@discrete": ["--beta", "0.3"]}
# Behaviour cloning is IQL with beta = 0: every advantage weight exp(0 * adv) is 1, so the actor loss is the
# negative log-likelihood of the data's actions (docs/iql.md). Runs named "bc" are iql.py with these flags.
ALIASES = {"bc": ("iql", ["--beta", "0"]),
           # docs/finetune.md: Cal-QL, and the online baseline from scratch (SAC / double DQN: CQL with alpha 0,
           # every batch from the online data, 5,000 uniformly random steps before the first update as CleanRL's
           # learning_starts; its preset adds --total-steps 0 after the runner's --total-steps and, for Box, the SAC
           # target with its entropy term), both cql_finetune.py
           "calql": ("cql_finetune", ["--cal-ql"]),
           "scratch": ("cql_finetune", ["--cql-alpha", "0", "--online-ratio", "1", "--learning-starts", "5000"]),
           # docs/cql.md, critic ensembles: plain SAC (CQL without its term) and SAC-N with ten critics
           "sac": ("cql", ["--cql-alpha", "0"]), "sacn": ("cql", ["--cql-alpha", "0", "--n-critics", "10"])}
ONLINE = ["--online-steps", "50000"]
# a preset's "scripts": the script that runs in place of another for every algorithm of the preset (after ALIASES);
# fine-tuning is its own entry point, offline pre-training then the online phase (docs/finetune.md)
FINETUNE_SCRIPTS = {"iql": "iql_finetune", "cql": "cql_finetune"}
SAVE_EVERY_50K = ["--save-model", "--checkpoint-every", "50000"]

PRESETS = {
    # one seed of the eight core datasets, short runs: 41 minutes on 2 cores from a fresh clone (benchmark/README.md),
    # 70% of the run time Box CQL
    "small": dict(algos=["bc", "iql", "cql", "bcq"], seeds=[1], total_steps=5000, eval_every=1000, eval_episodes=10,
                  extra=DISCRETE_IQL_BETA,
                  datasets=["lunarlander-medium", "lunarlander-medium-expert", "lunarlander-mixed",
                            "lunarlander-continuous-medium", "lunarlander-continuous-medium-expert",
                            "lunarlander-continuous-mixed", "pendulum-medium", "cartpole-medium"]),
    # docs/choosing.md: which algorithm for which data, every data quality in both action spaces (Box CQL left
    # out: 3 min per 1,000 steps on this CPU; docs/choosing.md says where its rows come from)
    "choosing": dict(algos=["bc", "iql", "cql", "bcq"], seeds=[1, 2, 3], total_steps=10000, eval_every=2000,
                     eval_episodes=10, extra=DISCRETE_IQL_BETA, skip=["cql@box"],
                     datasets=[f"{env}-{q}" for env in ("lunarlander", "pendulum")
                               for q in ("random", "medium", "expert", "medium-expert", "mixed")]),
    # docs/finetune.md: 20k offline steps, then 50k environment steps of fine-tuning (one gradient step each),
    # against the same 50k steps online from scratch. Box CQL / Cal-QL left out (3 min per 1,000 steps on this CPU)
    "finetune": dict(algos=["iql", "cql", "calql", "scratch"], seeds=[1, 2, 3], total_steps=20000, eval_every=5000,
                     eval_episodes=10, skip=["cql@box", "calql@box"], scripts=FINETUNE_SCRIPTS,
                     extra={**DISCRETE_IQL_BETA, "iql": ONLINE, "cql": ONLINE, "calql": ONLINE,
                            "scratch": [*ONLINE, "--total-steps", "0"], "scratch@box": ["--backup-entropy"]},
                     datasets=["lunarlander-medium", "lunarlander-continuous-medium"]),
    # docs/cql.md, critic ensembles: plain SAC collapses, ten critics (SAC-N) against CQL; Box only. Short runs:
    # Box CQL takes 3 min per 1,000 steps on this CPU
    "ensemble": dict(algos=["sac", "sacn", "cql"], seeds=[1, 2, 3], total_steps=5000, eval_every=1000,
                     eval_episodes=10, extra={},
                     datasets=["lunarlander-continuous-medium", "lunarlander-continuous-expert"]),
    # docs/mujoco.md: the locomotion datasets at research scale, one seed (IQL with the authors' locomotion reward
    # scaling). Pick the datasets with --datasets: hopper-medium, hopper-medium-replay, halfcheetah-medium, ...
    # Runs save their policy every 50,000 steps (the policies ope.py is validated on, docs/ope.md)
    "mujoco": dict(algos=["iql", "bcq"], seeds=[1], total_steps=300000, eval_every=25000, eval_episodes=10,
                   extra={"iql": ["--reward-scaling", "return-range", *SAVE_EVERY_50K],
                          "bcq": SAVE_EVERY_50K, "d3rlpy_iql": ["--reward-scaling", "return-range"]},
                   datasets=["hopper-medium", "hopper-medium-replay", "halfcheetah-medium", "walker2d-medium",
                             "halfcheetah-medium-expert"]),
    # the learning table of the docs: 3 seeds, every quality but random
    "full": dict(algos=["iql", "cql", "bcq"], seeds=[1, 2, 3], total_steps=100000, eval_every=5000,
                 eval_episodes=10, extra=DISCRETE_IQL_BETA,
                 datasets=[f"{env}-{q}" for env in ("lunarlander", "lunarlander-continuous", "pendulum", "cartpole")
                           for q in ("medium", "expert", "medium-expert", "mixed")]),
}


# Seconds per 1,000 gradient steps of one run on one core of this project's 2-core CPU machine, evaluation
# included. Ours: the small preset timed from a fresh clone, two runs at a time (benchmark/README.md: 41 min).
# d3rlpy's: ours times the ours/d3rlpy steps/s ratio of the first side-by-side queue (IQL Box 1.43, CQL
# discrete 2.09, BCQ Box 1.45, BCQ discrete 1.65; Box CQL: 832 s per 5k steps, timed alone), close to the
# ratios benchmark/speed_pairs.sh measures (docs/benchmark.md, "Speed").
# Used only to start the longest runs first (so the last ones to finish are short) and to print an estimate of
# the wall time before starting.
SECONDS_PER_1K_STEPS = {("iql", True): 10, ("iql", False): 10, ("bc", True): 10, ("bc", False): 10,
                        ("cql", True): 178, ("cql", False): 5, ("sac", True): 40, ("sacn", True): 100,
                        ("bcq", True): 42, ("bcq", False): 3, ("d3rlpy_iql", True): 14, ("d3rlpy_iql", False): 1,
                        ("d3rlpy_cql", True): 166, ("d3rlpy_cql", False): 11, ("d3rlpy_bcq", True): 61,
                        ("d3rlpy_bcq", False): 5,
                        # docs/finetune.md's aliases: Cal-QL costs what CQL costs; "scratch" is SAC (Box) or double
                        # DQN (Discrete), timed in the finetune preset (50k online steps in 575 s on LunarLander)
                        ("calql", True): 178, ("calql", False): 5, ("scratch", True): 40, ("scratch", False): 12}


def is_box(dataset: str) -> bool:
    """Whether a dataset has a Box action space, from its name: every one but the discrete lunarlander-* and
    cartpole-* (Minari ids and .npz files count as Box)."""
    return "continuous" in dataset or dataset.split("-")[0] not in ("lunarlander", "cartpole")


def extra_flags(extra: dict[str, list[str]], algo: str, dataset: str) -> list[str]:
    """The --extra flags for one run: those given for `algo`, then those for `algo@box` or `algo@discrete`."""
    return extra.get(algo, []) + extra.get(f"{algo}@{'box' if is_box(dataset) else 'discrete'}", [])


def flag_value(flags: list[str], name: str, default: float) -> float:
    """The value of `name` in a run's flags, the last one given winning (as tyro reads them), or `default`."""
    values = [flags[i + 1] for i in range(len(flags) - 1) if flags[i] == name]
    return float(values[-1]) if values else default


def expected_seconds(algo: str, dataset: str, total_steps: int, flags: list[str] | None = None) -> float:
    """A run's expected wall time on one core (SECONDS_PER_1K_STEPS; Minari and .npz datasets count as Box). Its
    gradient steps are --total-steps (a --total-steps in its extra `flags` overrides the preset's) plus
    --online-steps x --utd: an online step costs about what a gradient step does (the finetune preset's runs)."""
    flags = flags or []
    steps = flag_value(flags, "--total-steps", total_steps)
    steps += flag_value(flags, "--online-steps", 0) * flag_value(flags, "--utd", 1)
    return SECONDS_PER_1K_STEPS.get((algo, is_box(dataset)), 50) * steps / 1000


def schedule(costs: list[float], workers: int) -> float:
    """Wall time of running jobs with these costs, in this order, on `workers` parallel slots (each job goes to
    the slot that frees up first)."""
    slots = [0.0] * max(1, workers)
    for c in costs:
        slots[slots.index(min(slots))] += c
    return max(slots)


def logged_eta(log: Path) -> float | None:
    """The ETA in seconds that a run's own console last printed ("| ETA   12.3 min |"), or None before its first
    progress line (d3rlpy_run.py prints the same lines as our scripts)."""
    if not log.exists():
        return None
    with open(log, "rb") as f:
        f.seek(max(0, f.seek(0, os.SEEK_END) - 4096))
        found = re.findall(r"\| ETA +([0-9.]+) min", f.read().decode(errors="replace"))
    return float(found[-1]) * 60 if found else None


def eta_seconds(finished: list[tuple[float, float]], running: list[tuple[float, float, float | None]],
                queued: list[float], workers: int) -> float:
    """Wall time left: for each run still running, the ETA its own console printed, or else its expected cost
    (expected_seconds) less the time it has run; for each queued run its expected cost; packed on the slots as
    `schedule` does, the expected costs scaled by how long the finished runs really took against theirs.
    finished: (expected, actual seconds) of runs that completed normally; running: (expected, seconds so far,
    logged_eta or None); queued: expected, in start order."""
    expected_done = sum(e for e, _ in finished)
    speed = sum(a for _, a in finished) / expected_done if expected_done > 0 else 1.0
    left = [own if own is not None else max(e * speed - ran, 0.0) for e, ran, own in running]
    left += [e * speed for e in queued]
    return schedule(left, workers) if left else 0.0


def duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds >= 600 else f"{seconds / 60:.1f} min"


def job_key(algo: str, dataset: str, seed: int) -> str:
    return f"{algo}__{dataset.replace('/', '-')}__{seed}"


def job_list(cfg: dict) -> list[tuple[str, str, int]]:
    """(algo, dataset, seed) of every run, less the "algo@box" / "algo@discrete" combinations in cfg["skip"]: those
    are left out for their cost on a CPU, so with a GPU (--device other than cpu) they run."""
    skip = set(cfg.get("skip", [])) if cfg.get("device", "cpu") == "cpu" else set()
    return [(algo, d, s) for d in cfg["datasets"] for algo in cfg["algos"] for s in cfg["seeds"]
            if f"{algo}@{'box' if is_box(d) else 'discrete'}" not in skip]


def command(algo: str, dataset: str, seed: int, cfg: dict) -> list[str]:
    """The command of one run: its script (an alias's, then the preset's "scripts" in place of it) with the alias's
    flags, the runner's, then the extra flags (the last value of a flag wins, as tyro reads them)."""
    if algo.startswith("d3rlpy_"):  # the same run with d3rlpy, in its own virtual environment
        python, script = cfg["d3rlpy_python"], "benchmark/d3rlpy_run.py"
        start = ["--algo", algo.removeprefix("d3rlpy_")]
    else:
        script, alias_flags = ALIASES.get(algo, (algo, []))
        script = cfg.get("scripts", {}).get(script, script)
        python, script, start = sys.executable, f"{script}.py", ["--device", cfg["device"], *alias_flags]
    return [python, str(ROOT / script), *start, "--dataset", dataset, "--seed", str(seed),
            "--total-steps", str(cfg["total_steps"]), "--eval-every", str(cfg["eval_every"]),
            "--eval-episodes", str(cfg["eval_episodes"]), "--exp-name", f"{algo}-{cfg['tag']}",
            *extra_flags(cfg["extra"], algo, dataset)]


def folder_config(cfg: dict, previous: dict) -> dict:
    """What config.json records of a results folder: this command's settings, with the algorithms, datasets, seeds
    and extra flags of earlier commands into the same folder kept beside its own (a folder built by several
    commands, --datasets a few at a time, lists all of them; the done/*.json files hold each run's own command)."""
    merged = {k: list(dict.fromkeys(previous.get(k, []) + cfg[k])) for k in ("algos", "datasets", "seeds")}
    return dict(cfg, **merged, extra={**previous.get("extra", {}), **cfg["extra"]})


def one_thread() -> dict[str, str]:
    """The environment of a run: this process's, with one torch thread."""
    return dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")


def run_local(cmd: list[str], cwd: Path, log: Path) -> int:
    """Run a command in `cwd` on this machine, its console output into `log`; return its exit status."""
    with open(log, "w") as f:
        return subprocess.run(cmd, cwd=cwd, stdout=f, stderr=subprocess.STDOUT, env=one_thread()).returncode


def for_worker(cmd: list[str]) -> list[str]:
    """A run's command as a Ray task runs it (run_in_temp_folder): this Python as "{python}" (the worker's), files
    of the project as "{code}/..." (the worker's copy)."""
    def move(arg: str) -> str:
        path = Path(arg)
        return f"{{code}}/{path.relative_to(ROOT)}" if path.is_absolute() and path.is_relative_to(ROOT) else arg
    return ["{python}" if cmd[0] == sys.executable else cmd[0], *map(move, cmd[1:])]


def write_files(folder: Path, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)


class RunKilled(RuntimeError):
    """A run ended by a signal, as when its node goes down: Ray starts the task again (retry_exceptions)."""


def run_in_temp_folder(cmd: list[str]) -> tuple[int, bytes, dict[str, bytes]]:
    """The Ray task: a command from for_worker, run in a new temporary folder with this node's Python and copy of
    the project (Ray starts the task in its working_dir). Returns the exit status, the console output and every file
    the run wrote (runs/{run}/...)."""
    cmd = [arg.replace("{python}", sys.executable).replace("{code}", os.getcwd()) for arg in cmd]
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.run(cmd, cwd=tmp, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=one_thread())
        files = {str(p.relative_to(tmp)): p.read_bytes() for p in Path(tmp).rglob("*") if p.is_file()}
    if proc.returncode < 0:  # its node may answer before it dies: a run killed by a signal is a lost run, not a result
        raise RunKilled(f"{' '.join(cmd[1:3])} killed by signal {-proc.returncode}")
    return proc.returncode, proc.stdout, files


def start_ray(address: str, gpus_per_run: float) -> tuple[Callable, int]:
    """Join the Ray cluster at `address` ("local": start one here) with the project as the tasks' working_dir.
    Returns a drop-in for run_local that runs the command as a Ray task, and how many runs fit on the cluster at
    once."""
    import ray

    ray.init(address=address, runtime_env=dict(working_dir=str(ROOT), excludes=RAY_EXCLUDES))
    task = ray.remote(run_in_temp_folder).options(num_cpus=1, num_gpus=gpus_per_run, max_retries=RAY_RETRIES,
                                                   retry_exceptions=[RunKilled])
    resources = ray.cluster_resources()
    slots = int(resources.get("CPU", 1))
    if gpus_per_run > 0:
        slots = min(slots, int(resources.get("GPU", 0) / gpus_per_run))

    def run_remote(cmd: list[str], cwd: Path, log: Path) -> int:
        try:
            status, console, files = ray.get(task.remote(for_worker(cmd)))
        except ray.exceptions.RayError as e:  # e.g. its node died more than RAY_RETRIES times
            status, console, files = -1, f"Ray task failed: {e}\n".encode(), {}
        write_files(cwd, files)
        log.write_bytes(console)
        return status

    return run_remote, max(1, slots)


def run_job(algo: str, dataset: str, seed: int, cfg: dict, out: Path, execute: Callable = run_local) -> str:
    key = job_key(algo, dataset, seed)
    marker = out / "done" / f"{key}.json"
    if marker.exists():
        return f"skip {key} (done)"
    cmd = command(algo, dataset, seed, cfg)
    log = out / "logs" / f"{key}.log"
    t0 = time.time()
    returncode = execute(cmd, out, log)
    info = dict(cmd=" ".join(cmd[1:]), algo=algo, dataset=dataset, seed=seed)
    if returncode == D3RLPY_NOT_AVAILABLE and algo.startswith("d3rlpy_"):
        marker.write_text(json.dumps(dict(info, not_available=log.read_text().strip().splitlines()[-1]), indent=1))
        return f"n/a  {key} (d3rlpy has no such variant)"
    if returncode != 0:
        return f"FAIL {key} (exit {returncode}, see {log})"
    marker.write_text(json.dumps(dict(info, wall_s=time.time() - t0), indent=1))
    return f"done {key} in {time.time() - t0:.0f}s"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=PRESETS, default="small")
    p.add_argument("--algos", nargs="+")
    p.add_argument("--datasets", nargs="+")
    p.add_argument("--seeds", nargs="+", type=int)
    p.add_argument("--total-steps", type=int)
    p.add_argument("--eval-every", type=int)
    p.add_argument("--eval-episodes", type=int)
    p.add_argument("--tag", help="results folder name (default: the preset's name)")
    p.add_argument("--workers", type=int, help="parallel runs (default: CPU cores; with --ray, the runs that fit on "
                                               "the cluster at once)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--ray", nargs="?", const="local", metavar="ADDRESS",
                   help="run each run as a Ray task on the cluster at ADDRESS (auto, ray://host:10001, host:port); "
                        "without one, on a Ray cluster started on this machine (pip install -r "
                        "benchmark/requirements-ray.txt; docs/benchmark.md, 'More than one machine')")
    p.add_argument("--gpus-per-run", type=float, default=0.0, metavar="F",
                   help="with --ray: GPUs each run asks Ray for (fractions share one; pass --device cuda too)")
    p.add_argument("--results-dir", default=str(ROOT / "benchmark" / "results"), help="where {tag}/ is written")
    p.add_argument("--with-d3rlpy", action="store_true",
                   help="also run d3rlpy's version of each algorithm (d3rlpy_iql, ...) with the same settings, "
                        "via benchmark/d3rlpy_run.py in the --d3rlpy-python environment")
    p.add_argument("--d3rlpy-python", default=str(ROOT / ".venv-d3rlpy" / "bin" / "python"),
                   help="the interpreter of the d3rlpy virtual environment (benchmark/requirements-d3rlpy.txt)")
    p.add_argument("--extra", action="append", default=[], metavar="ALGO:FLAGS",
                   help='extra flags for one algorithm, e.g. --extra "iql:--beta 1.0"; ALGO@box or ALGO@discrete '
                        'limits them to one action space (replaces the preset\'s flags for that key)')
    p.add_argument("--status-every", type=float, default=10.0, metavar="MIN",
                   help="print the progress line (and the runs in flight) after this many minutes without a run "
                        "ending (default: 10)")
    a = p.parse_args()
    if not a.status_every > 0:
        p.error(f"--status-every {a.status_every}: must be a positive number of minutes")
    if a.gpus_per_run and not a.ray:
        p.error("--gpus-per-run needs --ray")
    cfg = dict(PRESETS[a.preset])
    for k in ("algos", "datasets", "seeds", "total_steps", "eval_every", "eval_episodes"):
        if getattr(a, k) is not None:
            cfg[k] = getattr(a, k)
    if a.with_d3rlpy:
        if not Path(a.d3rlpy_python).exists():
            raise SystemExit(f"--with-d3rlpy: {a.d3rlpy_python} not found; create the d3rlpy environment as "
                             "benchmark/requirements-d3rlpy.txt says, or pass --d3rlpy-python")
        cfg["algos"] = [x for algo in cfg["algos"] for x in (algo, f"d3rlpy_{algo}") if x != "d3rlpy_bc"]
    cfg.update(tag=a.tag or a.preset, device=a.device, extra=dict(cfg.get("extra", {})),
               d3rlpy_python=a.d3rlpy_python)
    for e in a.extra:
        algo, flags = e.split(":", 1)
        cfg["extra"][algo] = flags.split()
    out = Path(a.results_dir) / cfg["tag"]
    (out / "done").mkdir(parents=True, exist_ok=True)
    (out / "logs").mkdir(exist_ok=True)
    config = out / "config.json"
    previous = json.loads(config.read_text()) if config.exists() else {}
    config.write_text(json.dumps(folder_config(cfg, previous), indent=1))
    jobs = job_list(cfg)
    todo = [j for j in jobs if not (out / "done" / f"{job_key(*j)}.json").exists()]
    for j in jobs:
        if j not in todo:
            print(f"skip {job_key(*j)} (done)")
    execute, slots = start_ray(a.ray, a.gpus_per_run) if a.ray and todo else (run_local, os.cpu_count())
    a.workers = a.workers or slots
    # longest first: a long run started last would leave the other cores idle at the end
    cost = {(algo, d, seed): expected_seconds(algo, d, cfg["total_steps"], extra_flags(cfg["extra"], algo, d))
            for algo, d, seed in todo}
    todo.sort(key=lambda j: -cost[j])
    eta = schedule([cost[j] for j in todo], a.workers)
    print(f"{len(jobs)} runs ({len(jobs) - len(todo)} already done), {a.workers} at a time, results in {out}; "
          f"expected wall time ~{eta / 60:.0f} min on a 2-core CPU like ours" + (" with the scripts' defaults (--extra "
          "flags may change it)" if a.extra else ""), flush=True)
    t0 = time.time()
    started: dict[tuple, float] = {}  # written by the worker threads as each run starts
    finished: list[tuple[float, float]] = []  # (expected, actual seconds) of the runs that completed normally
    ended: set[tuple] = set()  # every run that has returned (done, failed or not available)

    def start(job: tuple) -> str:
        started[job] = time.time()
        return run_job(*job, cfg, out, execute)

    def progress(n_done: int) -> str:
        now = time.time()
        left = [j for j in todo if j not in ended]
        running = [(cost[j], now - started[j], logged_eta(out / "logs" / f"{job_key(*j)}.log"))
                   for j in left if j in started]
        queued = [cost[j] for j in left if j not in started]
        line = f"[{n_done}/{len(todo)} runs, {duration(now - t0)} elapsed"
        return line + (f", ETA ~{duration(eta_seconds(finished, running, queued, a.workers))}]" if left else "]")

    with ThreadPoolExecutor(a.workers) as pool:
        pending = {pool.submit(start, j): j for j in todo}
        while pending:
            done, _ = wait(pending, timeout=60 * a.status_every, return_when=FIRST_COMPLETED)
            if not done:  # a long stretch without a run ending: say what is running
                now = time.time()
                running = ", ".join(f"{job_key(*j)} ({duration(now - started[j])})" for j in pending.values()
                                    if j in started)
                print(f"{progress(len(ended))} running: {running}", flush=True)
            for fut in done:
                j = pending.pop(fut)
                msg = fut.result()
                ended.add(j)
                if msg.startswith("done "):
                    finished.append((cost[j], time.time() - started[j]))
                print(f"{progress(len(ended))} {msg}", flush=True)
    print(f"finished in {(time.time() - t0) / 60:.1f} min", flush=True)


if __name__ == "__main__":
    main()
