"""docker/Dockerfile built for real, unchanged, on a CPU stand-in for its CUDA base image (tests/cluster/
cpu-base.Dockerfile on a debootstrapped Debian): the image installs CI's pins and runs `sparse-dc quickstart`."""
import json

import pytest

from local_docker import ROOT, ci_pins, normalise

pytestmark = [pytest.mark.cluster, pytest.mark.slow]


@pytest.fixture(scope="module")
def image(dockerd) -> str:
    debian = dockerd.debian_image("localhost/sparse-dc-test/debian:minbase")
    base = dockerd.cpu_base("localhost/sparse-dc-test/cpu-base", debian, ci_pins())
    dockerd.docker("build", "--network=host", f"--build-arg=BASE_IMAGE={base}", "-f",
                   str(ROOT / "docker" / "Dockerfile"), "-t", "localhost/sparse-dc-test/sparse-dc", str(ROOT),
                   timeout=1800, log=dockerd.root / "build.log")
    return "localhost/sparse-dc-test/sparse-dc"


def test_image_installs_the_ci_pins(dockerd, image):
    freeze = dockerd.docker("run", "--rm", "--network=none", "--entrypoint=pip", image, "list", "--format=json")
    installed = {normalise(p["name"]): p["version"] for p in json.loads(freeze.stdout)}
    pinned = {name: version for name, version in ci_pins().items() if name in installed}
    assert {"deepspeed", "triton", "pyarrow", "numpy", "datasets"} <= set(pinned)
    assert {name: installed[name].split("+")[0] for name in pinned} == pinned


def test_quickstart_runs_inside_the_image(dockerd, image, tmp_path):
    # no network at all; torchrun's standalone rendezvous resolves the container's host name, so name it localhost
    dockerd.docker("run", "--rm", "--network=none", "--hostname=localhost",
                   f"--volume={tmp_path}:/workspace/sparse-dc/runs", image, "quickstart", timeout=1200,
                   log=tmp_path / "quickstart.log")
    log = (tmp_path / "quickstart.log").read_text()
    assert "[5/5] plotting the training curves" in log and "done in" in log, log[-3000:]
    rows = (tmp_path / "quickstart" / "ledger.jsonl").read_text().splitlines()
    assert sorted(json.loads(r)["name"] for r in rows) == ["tiny-d0.5", "tiny-d1"]
    assert (tmp_path / "quickstart" / "curves.png").stat().st_size > 1000
