"""A regular (non-editable) install works from any folder: the shipped profiles, models, scenarios, accuracy
results and the measurements the dashboard shows travel with the package (xqsim/data), not only with the
checkout."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_a_regular_install_runs_from_another_folder(tmp_path):
    site = tmp_path / "site"
    isolation = [] if importlib.util.find_spec("setuptools") is None else ["--no-build-isolation"]
    build = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", *isolation, "--target",
                            str(site), str(ROOT)], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-2000:]
    assert not (site / "xqsim" / "data" / "hardware").is_symlink()  # the files themselves, not links
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}

    def xqsim(*args: str) -> subprocess.CompletedProcess:
        code = f"import sys; from xqsim.entry import main; sys.argv = ['xqsim', *{list(args)!r}]; main()"
        return subprocess.run([sys.executable, "-c", code], cwd=work, env=env, capture_output=True, text=True)

    where = subprocess.run([sys.executable, "-c", "import xqsim.loading as m; print(m.__file__)"], cwd=work, env=env,
                           capture_output=True, text=True).stdout
    assert where.startswith(str(site)), where
    r = xqsim("estimate", "--hardware", "h100_sxm", "--model", "llama-3.1-8b", "--scheme", "kivi", "--bits", "2",
              "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["hardware"] == "h100_sxm"
    r = xqsim("recommend", "--model", "llama-3.1-8b", "--hardware", "h100_sxm", "--json")
    assert r.returncode == 0 and "kivi" in r.stdout, r.stderr
    r = xqsim("hw", "list")
    assert r.returncode == 0 and "b200" in r.stdout, r.stderr
    shipped = site / "xqsim" / "data" / "measurements"  # the dashboard's calibration view and its script
    assert len(list(shipped.glob("*/*.json"))) >= 7 and (site / "xqsim" / "dashboard" / "app.py").is_file()
    (work / "taken").write_text("mine")  # a shipped scenario by name, stopped at its output path before any work
    r = xqsim("sweep", "long_ctx", "-o", "taken")
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip() == "xqsim: error: taken: is a file, not a folder; choose another -o DIR", r.stderr
