"""The README's results tables are the committed results, not a copy that drifts: each cell equals the final
evaluation of its runs in benchmark/results/<folder>/scores.json (mean ± std over seeds, and the best evaluation
during training in brackets), and the table is exactly what `readme_table` prints from them."""

import json
import re
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDER = ROOT / "benchmark" / "results" / "choosing"
# the README's two tables: (datasets, algorithms), every cell from five seeds
TABLES = {"LunarLander": (["lunarlander-random", "lunarlander-mixed", "lunarlander-medium",
                           "lunarlander-medium-expert", "lunarlander-expert"], ["bc", "iql", "cql", "bcq"]),
          "Pendulum": (["pendulum-random", "pendulum-mixed", "pendulum-medium", "pendulum-medium-expert",
                        "pendulum-expert"], ["bc", "iql"])}
NAMES = {"bc": "BC", "iql": "IQL", "cql": "CQL", "bcq": "BCQ"}


def readme_table(datasets: list[str], algos: list[str]) -> str:
    """A README results table from the choosing folder's scores.json: final mean ± std over seeds (the best
    evaluation during training, mean over seeds, in brackets); 'data' from its results.md."""
    runs = defaultdict(list)
    for r in json.loads((FOLDER / "scores.json").read_text()):
        runs[r["algo"], r["dataset"]].append(r)
    data = {row[1].strip(): row[2].strip() for row in
            (line.split("|") for line in (FOLDER / "results.md").read_text().splitlines() if line.startswith("| "))}
    lines = ["| dataset | data | " + " | ".join(NAMES[a] for a in algos) + " |", "|---|---|" + "---|" * len(algos)]
    for d in datasets:
        cells = []
        for a in algos:
            final = np.array([r["score"][-1] for r in runs[a, d]])
            best = np.array([max(r["score"]) for r in runs[a, d]])
            cells.append(f"{final.mean():.1f} ± {final.std():.1f} ({best.mean():.1f})".replace("-", "−"))
        lines.append(f"| `{d}` | {data[d].replace('-', '−')} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


@pytest.mark.parametrize("env", TABLES)
def test_the_readme_table_is_the_committed_results(env):
    datasets, algos = TABLES[env]
    readme, table = (ROOT / "README.md").read_text(), readme_table(datasets, algos)
    assert table in readme, f"README's {env} table differs from benchmark/results/choosing:\n{table}"
    # every cell of it: five seeds of 10,000 steps each
    seeds = defaultdict(set)
    for r in json.loads((FOLDER / "scores.json").read_text()):
        if r["dataset"] in datasets and r["algo"] in algos:
            assert r["steps"][-1] == 10000
            seeds[r["algo"], r["dataset"]].add(r["seed"])
    assert len(seeds) == len(datasets) * len(algos) and all(s == {1, 2, 3, 4, 5} for s in seeds.values())


def test_the_readme_iqm_line_is_the_committed_one():
    # results.md's aggregate table (benchmark/aggregate.py): | algo | runs | IQM [CI] | mean [CI] |
    rows = [line.split("|") for line in (FOLDER / "results.md").read_text().splitlines()
            if re.match(r"\| (bc|iql|cql|bcq) \| \d+ \| ", line)]
    readme = " ".join((ROOT / "README.md").read_text().split())  # the README wraps lines anywhere
    assert len(rows) == 6  # LunarLander: the four algorithms; Pendulum: BC and IQL
    for row in rows:
        assert f"{row[1].strip().upper()} {row[3].strip()}" in readme, row


if __name__ == "__main__":
    for datasets, algos in TABLES.values():
        print(readme_table(datasets, algos), end="\n\n")
