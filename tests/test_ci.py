"""The CI entry point: `.ci/run` -> `make test`, whose `chromium` prerequisite must stop the
build when no browser can be installed (rather than the browser test skipping quietly)."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _bin(tmp_path: Path, **scripts: str) -> dict[str, str]:
    """Stand-in executables in tmp_path/bin, first on PATH."""
    d = tmp_path / "bin"
    d.mkdir(exist_ok=True)
    for name, body in scripts.items():
        (d / name).write_text("#!/bin/sh\n" + body)
        (d / name).chmod(0o755)
    return {**os.environ, "PATH": f"{d}:{os.environ['PATH']}"}


def _make_chromium(env: dict[str, str], names: str) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "-s", "chromium", f"CHROMIUM_NAMES={names}"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)


def test_make_chromium_fails_when_the_install_fails(tmp_path):
    calls = tmp_path / "apt.log"
    env = _bin(tmp_path, **{"apt-get": f'echo "$@" >> {calls}\necho "E: Unable to locate package" >&2\nexit 100\n'})
    r = _make_chromium(env, "no-such-browser-1 no-such-browser-2")
    assert r.returncode != 0 and "Unable to locate package" in r.stderr
    assert calls.read_text().splitlines()[0].startswith("update")  # the index is refreshed first
    # apt-get "succeeds" but no browser appears: still a failure, saying which names were looked for
    env = _bin(tmp_path, **{"apt-get": f'echo "$@" >> {calls}\nexit 0\n'})
    r = _make_chromium(env, "no-such-browser-1")
    assert r.returncode != 0 and "Chromium install failed" in r.stderr and "no-such-browser-1" in r.stderr
    # a browser under any of the names is enough, and then apt-get is not called
    calls.unlink()
    env = _bin(tmp_path, **{"chromium-browser": "exit 0\n", "apt-get": f"echo called >> {calls}\nexit 1\n"})
    r = _make_chromium(env, "no-such-browser-1 chromium-browser")
    assert r.returncode == 0, r.stderr
    assert not calls.exists()


def test_ci_script_runs_make_test_with_ci_set(tmp_path):
    env = _bin(tmp_path, make='echo "make $* CI=$CI"\n')
    env.pop("CI", None)
    r = subprocess.run(["bash", str(ROOT / ".ci" / "run")], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "make test CI=true"
    env = _bin(tmp_path, make="exit 7\n")
    assert subprocess.run(["bash", str(ROOT / ".ci" / "run")], env=env, timeout=60).returncode == 7
