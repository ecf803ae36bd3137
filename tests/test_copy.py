"""The copy test: a researcher lifts one algorithm script out of the project with the two files it imports
(common.py, datasets.py) and nothing else; it must train there, on an .npz the test writes, online phase included."""

import shutil

import pytest
from tests.conftest import ROOT, run_script

import datasets as D


@pytest.mark.slow
@pytest.mark.parametrize("script, flags", [("iql.py", []), ("cql.py", []), ("bcq.py", []),
                                           ("iql.py", ["--online-steps", "20"]),
                                           ("cql.py", ["--cal-ql", "--online-steps", "20"])])
def test_a_script_with_common_and_datasets_alone_trains_in_an_empty_folder(tmp_path, script, flags):
    for name in (script, "common.py", "datasets.py"):
        shutil.copy(ROOT / name, tmp_path / name)
    D.save_npz(D.generate_builtin("cartpole-medium", 2000), tmp_path / "data.npz")
    out = run_script(script, "--dataset", "data.npz", "--total-steps", "50", "--batch-size", "16",
                     "--eval-every", "50", "--eval-episodes", "1", "--save-model", *flags, cwd=tmp_path,
                     env_root=tmp_path)
    assert f"{script}: done" in out and (tmp_path / "runs").is_dir()
