"""The copy test: a researcher lifts one algorithm script out of the project with the files it imports and nothing
else (an offline script: common.py and datasets.py; a fine-tuning script: its offline script and online.py too); it
must train there, on an .npz the test writes."""

import shutil

import pytest
from tests.conftest import ROOT, run_script

import datasets as D

FILES = {"iql.py": [], "cql.py": [], "bcq.py": [], "iql_finetune.py": ["iql.py", "online.py"],
         "cql_finetune.py": ["cql.py", "online.py"]}


@pytest.mark.slow
@pytest.mark.parametrize("script, flags", [("iql.py", []), ("cql.py", []), ("bcq.py", []),
                                           ("iql_finetune.py", ["--online-steps", "20"]),
                                           ("cql_finetune.py", ["--cal-ql", "--online-steps", "20"])])
def test_a_script_with_the_files_it_imports_alone_trains_in_an_empty_folder(tmp_path, script, flags):
    for name in (script, "common.py", "datasets.py", *FILES[script]):
        shutil.copy(ROOT / name, tmp_path / name)
    D.save_npz(D.generate_builtin("cartpole-medium", 2000), tmp_path / "data.npz")
    out = run_script(script, "--dataset", "data.npz", "--total-steps", "50", "--batch-size", "16",
                     "--eval-every", "50", "--eval-episodes", "1", "--save-model", *flags, cwd=tmp_path,
                     env_root=tmp_path)
    assert f"{script}: done" in out and (tmp_path / "runs").is_dir()


def test_each_script_imports_only_the_files_the_copy_test_copies():
    # what a reader must copy: the imports of the project's own modules, read from the source
    import ast

    own = {p.stem for p in ROOT.glob("*.py")}
    for script, extra in FILES.items():
        tree = ast.parse((ROOT / script).read_text())
        names = {n.module if isinstance(n, ast.ImportFrom) else a.name for n in ast.walk(tree)
                 if isinstance(n, (ast.Import, ast.ImportFrom)) for a in n.names}
        assert {m for m in names if m in own} <= {"common", "datasets", *(f[:-3] for f in extra)}, script
