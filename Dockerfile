# syntax=docker/dockerfile:1
# aep-exporter's container image: the daemon by default, every other command on request.
#
#   docker build -t aep-exporter .
#   docker run -d --name aep-exporter --read-only --tmpfs /tmp --cap-drop ALL \
#     --security-opt no-new-privileges -v aep-exporter-state:/var/lib/aep-exporter \
#     -v /etc/aep-exporter:/etc/aep-exporter:ro \
#     -v /etc/aep-exporter/client_secret:/run/secrets/aep_client_secret:ro aep-exporter
#
# README.md ("As a container") has the rest. The image is the runtime only: the emulator
# (aep_emulator/, and its extra's pyarrow and jsonschema) stays out; run it from a pip install
# with the extra, `pip install 'aep-exporter[emulator]'` (README, "As a container").
# tests/test_packaging.py checks this file's essentials and builds the wheel it installs.

# --- builder: the wheel, and a virtual environment with it and its dependencies -----------
FROM python:3.11-slim-bookworm AS builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

WORKDIR /src
# Only what the wheel is built from (.dockerignore keeps the rest out of the context).
COPY pyproject.toml README.md LICENSE ./
COPY exporter ./exporter
RUN python -m pip wheel --no-cache-dir --no-deps --wheel-dir /dist .

# The runtime's dependencies and the extras in EXTRAS: by default [redis] (the Redis Streams
# intake is a job source of the daemon, and its client is small); never [emulator]. Delivery
# verification at the destination needs [delivery] (obstore, asyncssh: 37 MB more):
# `docker build --build-arg EXTRAS=redis,delivery .`. Every dependency has a binary wheel for
# CPython 3.11 on Linux (x86-64 and arm64), so no compiler is needed here either. The
# environment gets no pip of its own: the running image installs nothing. pip byte-compiles
# everything, so nothing writes .pyc files at run time.
ARG EXTRAS=redis
RUN python -m venv --without-pip /opt/aep-exporter \
    && wheel="$(echo /dist/aep_exporter-*.whl)" \
    && python -m pip --python /opt/aep-exporter/bin/python install --no-cache-dir \
        "${wheel}[${EXTRAS}]"

# --- runtime: the interpreter, the environment, a non-root user ----------------------------
FROM python:3.11-slim-bookworm

LABEL org.opencontainers.image.title="aep-exporter" \
      org.opencontainers.image.description="Export Adobe Experience Platform datasets to cloud storage" \
      org.opencontainers.image.licenses="Apache-2.0"

# A fixed uid and gid (10001), so that volumes, bind mounts and producers sharing the spool
# can be granted access by number. The state folder is created here, owned by that user, so
# a new named volume starts with these owners and modes: spool/incoming/ is group-writable
# (setgid: dropped files belong to group 10001; sticky: writers cannot remove each other's).
RUN groupadd --system --gid 10001 aep-exporter \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin aep-exporter \
    && install -d -m 0750 -o 10001 -g 10001 /var/lib/aep-exporter /var/lib/aep-exporter/spool \
    && install -d -m 3770 -o 10001 -g 10001 /var/lib/aep-exporter/spool/incoming \
    && install -d -m 0755 /etc/aep-exporter

COPY --from=builder /opt/aep-exporter /opt/aep-exporter

# Read-only root file system: the only writes are to the volume and /tmp (give it a tmpfs:
# --tmpfs /tmp). HOME points there for any library that wants a home folder.
# The configuration is mounted at /etc/aep-exporter/exporter.toml; the AEP client secret is
# found at /run/secrets/aep_client_secret (a Docker or Kubernetes secret), or set
# aep.client_secret_file. Destination secrets are files named by the configuration.
ENV PATH=/opt/aep-exporter/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    EXPORTER_CONFIG=/etc/aep-exporter/exporter.toml

# The journal (journal.sqlite3) and the spool (spool/incoming, processing, done, failed,
# rejected): the configuration's defaults, daemon.state_dir and daemon.spool_dir.
VOLUME ["/var/lib/aep-exporter"]
WORKDIR /var/lib/aep-exporter
USER 10001:10001

# Health: `aep-exporter probe` asks the admin server's /healthz (loopback, port 9464 by
# default, read from the same configuration), which fails when the event loop has been
# blocked beyond admin.loop_stall_s or a supervised task died: a daemon alive but wedged is
# unhealthy. The daemon is this container's PID 1 (exec-form ENTRYPOINT), so if it exits the
# container stops.
HEALTHCHECK --interval=30s --timeout=10s --start-period=30s --retries=3 \
    CMD ["aep-exporter", "probe"]

ENTRYPOINT ["aep-exporter"]
CMD ["run"]
