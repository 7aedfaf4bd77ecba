# A CPU stand-in for docker/Dockerfile's base image (the PyTorch CUDA image cannot be pulled or run here): Debian
# with Python, and a virtualenv on PATH that holds torch and triton, as the PyTorch image holds its CUDA torch and
# the Triton it was built with. Built by tests/cluster/test_docker_image.py from a debootstrapped root filesystem.
ARG ROOTFS_IMAGE
FROM ${ROOTFS_IMAGE}

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV DEBIAN_FRONTEND=noninteractive \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:${PATH} \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_CERT=/etc/ssl/certs/ca-certificates.crt

# The build machine's extra certificate authorities (HTTPS to the package index may go through them), then the
# image's own certificate bundle with them added.
COPY certs/ /usr/local/share/ca-certificates/
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && update-ca-certificates \
    && rm -rf /var/lib/apt/lists/*

# torch (CPU build) and triton as wheels from the build context: the versions CI pins.
COPY wheels/ /tmp/wheels/
RUN python3 -m venv /opt/venv \
    && pip install /tmp/wheels/*.whl \
    && rm -rf /tmp/wheels
