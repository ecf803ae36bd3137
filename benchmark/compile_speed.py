"""Steps/second of each script eager and with --compile, on synthetic MuJoCo-sized data (17-dim observations; Box:
6-dim actions, Discrete: 6 actions), no evaluation. Runs one after another, so compare rows of one table only.

    python benchmark/compile_speed.py                      # CPU, one thread (about 25 minutes on our 2-core CPU)
    python benchmark/compile_speed.py --device cuda        # a GPU (benchmark/gpu_speed.sh)

Each run logs twice (--log-every = half the steps): the first window holds the compilation, the second is the
steady speed. Compile time = first window's wall time - its steps at the steady speed. Writes compile_speed.md
(and .json) to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from datasets import Dataset, save_npz  # noqa: E402

# gradient steps per run on a CPU (two log windows each); a GPU runs --gpu-scale times more
STEPS = {("iql", "box"): 1000, ("iql", "discrete"): 1000, ("cql", "box"): 100, ("cql", "discrete"): 2000,
         ("bcq", "box"): 400, ("bcq", "discrete"): 4000}


def synthetic(discrete: bool, n: int, seed: int = 0) -> Dataset:
    """n random transitions shaped like D4RL's halfcheetah (17-dim observations, 6 action dims or 6 actions)."""
    rng = np.random.default_rng(seed)
    obs = rng.standard_normal((n, 17)).astype(np.float32)
    actions = rng.integers(0, 6, n) if discrete else rng.uniform(-1, 1, (n, 6)).astype(np.float32)
    done = np.zeros(n, bool)
    done[999::1000] = True
    return Dataset(observations=obs, actions=actions, rewards=rng.standard_normal(n).astype(np.float32),
                   next_observations=np.roll(obs, -1, 0), terminals=np.zeros(n, bool), timeouts=done,
                   name="synthetic-discrete" if discrete else "synthetic-box")


def sps_windows(out: Path, exp_name: str) -> list[float]:
    """The charts/SPS values of the newest run named exp_name under out/runs (one per log window)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = max((out / "runs").glob(f"*__{exp_name}__*"), key=lambda r: r.stat().st_mtime)
    return [e.value for e in EventAccumulator(str(run)).Reload().Scalars("charts/SPS")]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--gpu-scale", type=int, default=20, help="steps multiplier when --device is not cpu")
    p.add_argument("--out", default=str(ROOT / "benchmark" / "results" / "compile-speed"))
    p.add_argument("--scripts", nargs="+", default=["iql", "cql", "bcq"])
    a = p.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for kind in ("box", "discrete"):
        paths[kind] = out / f"synthetic-{kind}.npz"
        if not paths[kind].exists():
            save_npz(synthetic(kind == "discrete", 200_000), paths[kind])
    rows = []
    for script in a.scripts:
        for kind in ("box", "discrete"):
            steps = STEPS[script, kind] * (1 if a.device == "cpu" else a.gpu_scale)
            for mode in ("eager", "compile"):
                cmd = [sys.executable, str(ROOT / f"{script}.py"), "--dataset", str(paths[kind]), "--device", a.device,
                       "--total-steps", str(steps), "--log-every", str(steps // 2), "--eval-episodes", "0",
                       "--exp-name", f"{script}-{mode}"] + (["--compile"] if mode == "compile" else [])
                t0 = time.time()
                proc = subprocess.run(cmd, cwd=out, capture_output=True, text=True,
                                      env=dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1"))
                wall = time.time() - t0
                if proc.returncode != 0:
                    raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
                first, steady = sps_windows(out, f"{script}-{mode}")[-2:]
                half = steps // 2
                compile_s = max(half / first - half / steady, 0.0) if mode == "compile" else 0.0
                rows.append(dict(script=script, actions=kind, mode=mode, steps=steps, steady_sps=steady,
                                 first_window_sps=first, compile_s=compile_s, wall_s=wall))
                print(f"{script:4s} {kind:8s} {mode:8s} {steady:8.1f} steps/s (first window {first:.1f}, "
                      f"compile ~{compile_s:.0f} s, wall {wall:.0f} s)", flush=True)
    table = ["| script | actions | eager steps/s | --compile steps/s | compiled / eager | compile time |",
             "|---|---|---|---|---|---|"]
    for script in a.scripts:
        for kind in ("box", "discrete"):
            e, c = (next(r for r in rows if (r["script"], r["actions"], r["mode"]) == (script, kind, m))
                    for m in ("eager", "compile"))
            table.append(f"| {script} | {kind} | {e['steady_sps']:.1f} | {c['steady_sps']:.1f} | "
                         f"{c['steady_sps'] / e['steady_sps']:.2f} | {c['compile_s']:.0f} s |")
    text = f"# Eager vs --compile on {a.device}\n\n" + "\n".join(table) + "\n"
    (out / "compile_speed.md").write_text(text)
    (out / "compile_speed.json").write_text(json.dumps(rows, indent=1))
    print(text)


if __name__ == "__main__":
    main()
