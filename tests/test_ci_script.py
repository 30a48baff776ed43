"""`.ci/run` builds a fresh virtualenv every time (a new temporary folder, removed at the end) and never
uses or touches the checkout's own .venv. Run here with a stand-in python3 that records its calls."""
import os
import subprocess

from tests.conftest import REPO


def test_ci_uses_a_new_virtualenv_and_leaves_dot_venv_alone(tmp_path):
    checkout = tmp_path / "checkout"
    (checkout / ".ci").mkdir(parents=True)
    (checkout / ".ci" / "run").write_bytes((REPO / ".ci" / "run").read_bytes())
    (checkout / ".venv").mkdir()
    (checkout / ".venv" / "mine").write_text("the user's environment")
    log = tmp_path / "calls.log"
    fake = tmp_path / "bin"
    fake.mkdir()
    # python3 -m venv DIR makes DIR/bin/activate, which defines `python` as a logger
    (fake / "python3").write_text(
        "#!/usr/bin/env bash\n"
        f"echo \"python3 $*\" >> {log}\n"
        "mkdir -p \"$3/bin\"\n"
        f"printf 'python() {{ echo \"python $*\" >> {log}; }}\\n' > \"$3/bin/activate\"\n")
    (fake / "python3").chmod(0o755)
    env = {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}", "TMPDIR": str(tmp_path)}
    r = subprocess.run(["bash", str(checkout / ".ci" / "run")], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    calls = log.read_text().splitlines()
    venv = calls[0].split()[-1]
    assert calls[0] == f"python3 -m venv {venv}" and venv.startswith(str(tmp_path / "tlearn-ci."))
    assert calls[-1] == "python -m pytest -q" and "python -m pip install --quiet -e .[test]" in calls
    assert not os.path.exists(venv)  # removed at the end
    assert (checkout / ".venv" / "mine").read_text() == "the user's environment"
