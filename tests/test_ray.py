"""benchmark/run.py --ray on a real Ray cluster of two nodes on this machine (ray.cluster_utils.Cluster: a head and a
worker node, one CPU each, separate raylets and object stores): the runs are those of the local process pool, bit
for bit, and a worker node killed mid-run costs a retry, not a result. Skipped where ray is not installed
(benchmark/requirements-ray.txt)."""

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytest.importorskip("ray")
from ray.cluster_utils import Cluster  # noqa: E402

pytestmark = pytest.mark.slow

# a tiny preset: IQL and CQL, 200 steps, two seeds, on a small discrete dataset (Box CQL would take minutes)
TINY = ["--algos", "iql", "cql", "--datasets", "cartpole-medium", "--seeds", "1", "2", "--total-steps", "200",
        "--eval-every", "100", "--eval-episodes", "2", "--tag", "tiny", "--extra", "iql:--save-model"]
NODE = dict(num_cpus=1, object_store_memory=100 * 2**20)


def benchmark(results: Path, *flags: str, wait: bool = True):
    cmd = [sys.executable, str(ROOT / "benchmark" / "run.py"), *TINY, "--results-dir", str(results), *flags]
    if not wait:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    return proc


def scalars(results: Path) -> dict:
    """{run folder without its timestamp: {tag: [(step, value)]}} of every TensorBoard log, less the speed (SPS)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logged = {}
    for run in sorted((results / "tiny" / "runs").iterdir()):
        ea = EventAccumulator(str(run)).Reload()
        logged[re.sub(r"__\d+$", "", run.name)] = {tag: [(e.step, e.value) for e in ea.Scalars(tag)]
                                                   for tag in ea.Tags()["scalars"] if tag != "charts/SPS"}
    return logged


def models(results: Path) -> dict[str, bytes]:
    return {re.sub(r"__\d+/", "/", str(p.relative_to(results))): p.read_bytes() for p in results.rglob("*.pt")}


def layout(results: Path) -> list[str]:
    """The files of a results folder, run folders without their timestamps and event files without host and pid."""
    files = [str(p.relative_to(results)) for p in results.rglob("*") if p.is_file()]
    return sorted(re.sub(r"\.out\.tfevents\..*", "", re.sub(r"__\d+/", "/", f)) for f in files)


@pytest.fixture(scope="module")
def local(tmp_path_factory) -> Path:
    """The tiny preset run by the local process pool, two at a time."""
    results = tmp_path_factory.mktemp("local")
    benchmark(results, "--workers", "2")
    return results


@pytest.fixture(scope="module")
def cluster():
    c = Cluster(initialize_head=True, head_node_args=dict(NODE, include_dashboard=False))
    c.add_node(**NODE)
    yield c
    c.shutdown()


def test_ray_runs_are_the_local_runs_bit_for_bit(cluster, local, tmp_path):
    first = benchmark(tmp_path, "--ray", cluster.address)
    assert "2 at a time" in first.stdout and first.stdout.count("done ") == 4, first.stdout
    # the same files: 4 runs' TensorBoard logs (and IQL's 2 models), console logs and done markers; config.json
    assert layout(tmp_path) == layout(local) and len(layout(local)) == 4 * 3 + 2 + 1
    assert scalars(tmp_path) == scalars(local)  # scores, losses, diagnostics: the same floats
    assert models(tmp_path) == models(local) and len(models(local)) == 2  # IQL's saved policies, byte for byte
    again = benchmark(tmp_path, "--ray", cluster.address)  # finished runs are skipped (no task, no connection)
    assert again.stdout.count("(done)") == 4 and "Connect" not in again.stderr, again.stdout + again.stderr


def training_runs_under(pid: int) -> list[int]:
    """The training processes (`--exp-name` in their command line) descended from process `pid`."""
    parent, cmdline = {}, {}
    for d in Path("/proc").glob("[0-9]*"):
        try:
            parent[int(d.name)] = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmdline[int(d.name)] = (d / "cmdline").read_bytes()
        except (OSError, IndexError):  # a process that ended meanwhile
            pass

    def descends(p: int) -> bool:
        while p not in (0, 1, pid):
            p = parent.get(p, 0)
        return p == pid

    return [p for p, cmd in cmdline.items() if b"--exp-name" in cmd and descends(p)]


def test_a_worker_node_killed_mid_run_costs_a_retry_and_every_run_lands_once(cluster, local, tmp_path):
    # two runs (seed 1) on the two one-CPU nodes: one lands on the worker node, which dies once it trains; a new
    # node joins (as an autoscaler would bring one), and the lost run is started again on a live node
    (doomed,) = cluster.worker_nodes
    raylet = doomed.all_processes["raylet"][0].process.pid
    proc = benchmark(tmp_path, "--seeds", "1", "--ray", cluster.address, wait=False)
    victim, t0 = None, time.time()
    while victim is None:  # a run on the worker node that has started training (its TensorBoard log exists)
        assert proc.poll() is None and time.time() - t0 < 300, "no run went to the worker node"
        victim = next((p for p in training_runs_under(raylet) if any(Path(f"/proc/{p}/cwd/runs").glob("*/events*"))),
                      None)
        time.sleep(0.2)
    args = Path(f"/proc/{victim}/cmdline").read_bytes().decode().split("\0")
    algo = args[args.index("--exp-name") + 1].removesuffix("-tiny")
    left_behind = Path(f"/proc/{victim}/cwd").resolve()  # its temporary folder, which a dead node may leave
    os.kill(victim, signal.SIGSTOP)  # so that it cannot finish before its node dies
    cluster.remove_node(doomed, allow_graceful=False)
    killed_at = time.time()
    cluster.add_node(**NODE)
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stdout + stderr[-3000:]
    assert not Path(f"/proc/{victim}").exists()  # the killed run died with its node, and was done again elsewhere
    shutil.rmtree(left_behind, ignore_errors=True)
    assert (tmp_path / "tiny" / "done" / f"{algo}__cartpole-medium__1.json").is_file(), stdout + stderr[-3000:]
    assert (tmp_path / "tiny" / "done" / f"{algo}__cartpole-medium__1.json").stat().st_mtime > killed_at
    # every run exactly once: one run folder, one log, one done marker each, and the numbers of the local runs
    assert sorted(re.findall(r"done (\S+) in", stdout)) == ["cql__cartpole-medium__1", "iql__cartpole-medium__1"]
    assert layout(tmp_path) == [f for f in layout(local) if "__2" not in f]
    assert scalars(tmp_path) == {run: v for run, v in scalars(local).items() if run.endswith("__1")}
