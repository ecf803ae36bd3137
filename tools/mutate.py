"""Mutation testing of the ALGO LOGIC: make one small, plausible bug at a time and check that a test catches it.

    python tools/mutate.py iql.py tests/test_iql.py                      # every mutant of iql.py's ALGO LOGIC
    python tools/mutate.py ope.py tests/test_ope.py --marker estimators --functions contributions,resample
    python tools/mutate.py cql.py tests/test_cql.py --jobs 2 --out mutants-cql.txt

What is mutated: the top-level functions and classes between the file's first `# ALGO LOGIC` comment and its
`if __name__ == "__main__":` block, except `diagnostics` and `load_policy` (logging and loading, not the algorithm);
or exactly the names given with --functions. Docstrings and comments are never touched. One mutant = one of:
  operator    + <-> -, * <-> /, ** -> *, < <-> >, <= <-> >=, == <-> !=, unary minus removed
  function    min <-> max, mean -> sum, logsumexp -> amax, argmax -> argmin, .detach() removed
  constant    a number n -> n + 1 (floats: 0 <-> 1, else doubled), True <-> False
  name        obs <-> next_obs, q1 <-> q2, a net <-> its target, actions <-> pi-style swaps listed in SWAPS
  statement   a bare call statement (opt.step(), loss.backward(), zero_grad, lerp_, sched.step()) deleted
The suite runs in a scratch copy of the project (the working tree is never modified) with `-x -m MARKER` (default
"not slow"); a mutant is killed when the tests fail or time out. Equivalent mutants (same behaviour) survive by
nature: list them, with why, in docs/testing.md.
"""

from __future__ import annotations

import argparse
import ast
import io
import os
import shutil
import subprocess
import sys
import tempfile
import time
import tokenize
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SKIP = {"diagnostics", "load_policy"}
OPERATORS = {"+": ["-"], "-": ["+"], "*": ["/"], "/": ["*"], "**": ["*"], "<": [">"], ">": ["<"], "<=": [">="],
             ">=": ["<="], "==": ["!="], "!=": ["=="], "+=": ["-="], "-=": ["+="]}
NAMES = {"min": ["max"], "max": ["min"], "amin": ["amax"], "amax": ["amin"], "mean": ["sum"], "logsumexp": ["amax"],
         "True": ["False"], "False": ["True"], "argmax": ["argmin"], "minimum": ["maximum"], "maximum": ["minimum"]}
SWAPS = [("obs", "next_obs"), ("q1", "q2"), ("q1_target", "q1"), ("q2_target", "q2"), ("qnet_target", "qnet"),
         ("actor_target", "actor"), ("critic_target", "critic"), ("rewards", "terminals"), ("q_target", "q"),
         ("actions", "pi"), ("logp_pi", "logp_next"), ("q1_data", "q2_data"), ("v", "target_q"),
         ("critics_target", "critics")]
DELETABLE = ("step", "backward", "zero_grad", "lerp_", "load_state_dict", "copy_", "update")


@dataclass
class Mutant:
    line: int  # 1-based
    col: int
    old: str
    new: str  # the replacement text for [col, col + len(old)) on that line; "pass" replaces the whole statement
    kind: str

    def describe(self, lines: list[str]) -> str:
        if self.kind == "statement":
            return f"line {self.line}: delete `{lines[self.line - 1].strip()}`"
        return f"line {self.line}: `{self.old}` -> `{self.new}` in `{lines[self.line - 1].strip()[:90]}`"

    def apply(self, lines: list[str]) -> list[str]:
        out = list(lines)
        text = out[self.line - 1]
        if self.kind == "statement":
            indent = text[: len(text) - len(text.lstrip())]
            out[self.line - 1] = f"{indent}pass\n"
        else:
            out[self.line - 1] = text[: self.col] + self.new + text[self.col + len(self.old):]
        return out


def target_ranges(source: str, functions: list[str] | None) -> list[tuple[int, int]]:
    """(first, last) line ranges of the definitions to mutate."""
    tree = ast.parse(source)
    lines = source.splitlines()
    if functions is None:
        start = next(i + 1 for i, text in enumerate(lines) if text.startswith("# ALGO LOGIC"))
        nodes = [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and n.lineno >= start
                 and n.name not in SKIP]
    else:
        nodes = [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and n.name in functions]
        missing = set(functions) - {n.name for n in nodes}
        if missing:
            raise SystemExit(f"mutate.py: no top-level definition named {sorted(missing)}")
    return [(n.lineno, n.end_lineno) for n in nodes]


def docstring_lines(source: str) -> set[int]:
    """Lines that belong to docstrings (never mutated)."""
    out: set[int] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.Module)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(
                    first.value.value, str):
                out.update(range(first.lineno, first.end_lineno + 1))
        if isinstance(node, ast.ClassDef):  # attribute docstrings: a bare string after an assignment
            for stmt in node.body[1:]:
                if isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant):
                    out.update(range(stmt.lineno, stmt.end_lineno + 1))
    return out


def bare_call_lines(source: str) -> set[int]:
    """Lines holding a single-line expression statement that calls one of DELETABLE (e.g. `opt.step()`)."""
    out = set()
    for node in ast.walk(ast.parse(source)):
        if (isinstance(node, ast.Expr) and isinstance(node.value, ast.Call) and node.lineno == node.end_lineno
                and isinstance(node.value.func, ast.Attribute) and node.value.func.attr in DELETABLE):
            out.add(node.lineno)
    return out


def parameter_positions(source: str) -> set[tuple[int, int]]:
    """(line, col) of every parameter name in a def: renaming one only makes a NameError, not a plausible bug."""
    return {(a.lineno, a.col_offset) for a in ast.walk(ast.parse(source)) if isinstance(a, ast.arg)}


def mutants(source: str, functions: list[str] | None) -> list[Mutant]:
    ranges = target_ranges(source, functions)
    inside = {i for a, b in ranges for i in range(a, b + 1)}
    skip = docstring_lines(source)
    params = parameter_positions(source)
    src_lines = source.splitlines()
    # a name swap is only plausible when the other name exists in the same definition
    names_in = {(a, b): {t.string for t in tokenize.generate_tokens(io.StringIO(
        "\n".join(src_lines[a - 1:b]) + "\n").readline) if t.type == tokenize.NAME} for a, b in ranges}
    found: list[Mutant] = []
    tokens = list(tokenize.generate_tokens(io.StringIO(source).readline))
    for i, tok in enumerate(tokens):
        row, col = tok.start
        if row not in inside or row in skip or tok.start[0] != tok.end[0]:
            continue
        prev = tokens[i - 1] if i else None
        nxt = tokens[i + 1] if i + 1 < len(tokens) else None
        if tok.type == tokenize.OP and tok.string in OPERATORS:
            if tok.string == "-" and prev is not None and (prev.type == tokenize.OP and prev.string in "(,=[:*+-/"
                                                          or prev.string in ("return", "in", "and", "or", "not")):
                found.append(Mutant(row, col, "-", "", "operator"))  # unary minus removed
                continue
            if tok.string == "*" and prev is not None and prev.type == tokenize.OP and prev.string in "(,":
                continue  # *args unpacking, not a product
            if tok.string == "**" and prev is not None and prev.type == tokenize.OP and prev.string in "(,":
                continue  # **kwargs
            for new in OPERATORS[tok.string]:
                found.append(Mutant(row, col, tok.string, new, "operator"))
        elif tok.type == tokenize.NAME and tok.string in NAMES:
            if tok.string in ("min", "max", "mean") and prev is not None and prev.string == "def":
                continue
            for new in NAMES[tok.string]:
                found.append(Mutant(row, col, tok.string, new, "function"))
        elif tok.type == tokenize.NAME and tok.string == "detach" and prev is not None and prev.string == "." \
                and nxt is not None and nxt.string == "(":
            found.append(Mutant(row, col - 1, ".detach()", "", "function"))
        elif tok.type == tokenize.NAME and tok.string == "where" and nxt is not None and nxt.string == "(":
            continue  # branch swaps are covered by the comparison operators inside
        elif tok.type == tokenize.NUMBER:
            try:
                value = ast.literal_eval(tok.string)
            except ValueError:
                continue
            if prev is not None and prev.string in ("[", ":") and nxt is not None and nxt.string in ("]", ":"):
                continue  # slicing/indexing constants: shape errors, not plausible equation bugs
            if isinstance(value, int):
                new = str(value + 1)
            else:
                new = "1.0" if value == 0 else "0.0" if value == 1 else repr(value * 2)
            found.append(Mutant(row, col, tok.string, new, "constant"))
        elif tok.type == tokenize.NAME:
            is_attr = prev is not None and prev.string == "."
            is_kw = nxt is not None and nxt.string == "=" and prev is not None and prev.string in "(,"
            if is_attr or is_kw or (row, col) in params:
                continue
            defined = next(names for (a, b), names in names_in.items() if a <= row <= b)
            for a, b in SWAPS:
                for old, new in ((a, b), (b, a)):
                    if tok.string == old and new in defined:
                        found.append(Mutant(row, col, old, new, "name"))
    for row in sorted(bare_call_lines(source) & inside - skip):
        found.append(Mutant(row, 0, "", "pass", "statement"))
    return found


def scratch_copy(dest: Path) -> None:
    for item in ROOT.iterdir():
        if item.name.startswith(".") or item.name in ("runs", "docs", "__pycache__"):
            continue
        if item.is_dir():  # benchmark/ without its results: ope.py imports benchmark/ope_report.py
            shutil.copytree(item, dest / item.name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "results"))
        elif item.suffix in (".py", ".toml", ".txt", ".cfg", ".ini"):
            shutil.copy2(item, dest / item.name)


def run_tests(workdir: Path, tests: list[str], timeout: int, marker: str) -> str:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-m", marker, "-p", "no:cacheprovider", *tests]
    try:
        proc = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "killed (timeout)"
    return "survived" if proc.returncode == 0 else "killed"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("file", help="the script to mutate, relative to the project root (e.g. iql.py)")
    p.add_argument("tests", nargs="+", help="test files to run against each mutant")
    p.add_argument("--functions", help="comma-separated top-level names to mutate instead of the ALGO LOGIC")
    p.add_argument("--jobs", type=int, default=1, help="mutants tested in parallel (one scratch copy each)")
    p.add_argument("--timeout", type=int, default=120, help="seconds before a mutant's test run counts as killed")
    p.add_argument("--out", help="also write the report to this file")
    p.add_argument("--limit", type=int, default=0, help="test only the first N mutants (0: all)")
    p.add_argument("--marker", default="not slow", help="pytest -m expression selecting the tests to run")
    args = p.parse_args()

    source = (ROOT / args.file).read_text()
    lines = source.splitlines(keepends=True)
    todo = mutants(source, args.functions.split(",") if args.functions else None)
    if args.limit:
        todo = todo[: args.limit]
    scratch = [Path(tempfile.mkdtemp(prefix=f"mutate{j}-")) for j in range(args.jobs)]
    for d in scratch:
        scratch_copy(d)
    baseline = run_tests(scratch[0], args.tests, args.timeout, args.marker)
    if baseline != "survived":
        raise SystemExit(f"mutate.py: the tests fail without any mutation ({baseline}); fix them first")
    print(f"{args.file}: {len(todo)} mutants, tests {' '.join(args.tests)}", flush=True)
    t0 = time.time()
    results: list[tuple[Mutant, str]] = []

    def work(job: int, batch: list[Mutant]) -> None:
        target = scratch[job] / args.file
        for m in batch:
            target.write_text("".join(m.apply(lines)))
            status = run_tests(scratch[job], args.tests, args.timeout, args.marker)
            results.append((m, status))
            done = len(results)
            eta = (time.time() - t0) / done * (len(todo) - done)
            print(f"[{done}/{len(todo)} ETA {eta / 60:.1f} min] {status:<16} {m.describe(lines)}", flush=True)
        target.write_text(source)

    with ThreadPoolExecutor(args.jobs) as pool:
        for future in [pool.submit(work, j, todo[j:: args.jobs]) for j in range(args.jobs)]:
            future.result()
    for d in scratch:
        shutil.rmtree(d, ignore_errors=True)

    results.sort(key=lambda r: (r[0].line, r[0].col))
    killed = sum(status.startswith("killed") for _, status in results)
    report = [f"{args.file}: {killed}/{len(results)} mutants killed ({100 * killed / max(len(results), 1):.1f}%) "
              f"by {' '.join(args.tests)} in {(time.time() - t0) / 60:.1f} min", "survivors:"]
    report += [f"  {m.describe(lines)}" for m, status in results if status == "survived"]
    print("\n".join(report))
    if args.out:
        Path(args.out).write_text("\n".join(report) + "\n")


if __name__ == "__main__":
    main()
