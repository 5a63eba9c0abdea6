# syntax=docker/dockerfile:1
# etrnd container image. Run it with the host's network namespace, or netlink sees only the
# container's own loopback and the daemon never notices the WAN link. README.md ("Install on a
# gateway", Docker) has the `docker build` / `docker run` commands, tested by
# tests/test_image.py; compose.yaml does the same. With podman/buildah, build with
# `--format docker`: the OCI image format has no HEALTHCHECK and they drop it (with a warning).
# Docker needs BuildKit for this file (the syntax line, RUN --mount): Docker >= 23, or
# DOCKER_BUILDKIT=1 on 20.10 (Debian 12's docker.io), whose classic builder fails on it.
# The secret file must be readable by UID 10001 (bind mounts keep the host's owner and mode).
# Mounted at /run/secrets/isp, the example config's `password_file: isp` finds it unchanged:
# CREDENTIALS_DIRECTORY below plays the part systemd's LoadCredential= plays for the unit.

# Pin the base for reproducible builds, e.g.
#   --build-arg PYTHON_IMAGE=python:3.11-slim-bookworm@sha256:<digest>
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- build: turn the source and its dependencies into wheels --------------------------------
FROM ${PYTHON_IMAGE} AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY etrnd/ etrnd/
RUN pip wheel --no-cache-dir --disable-pip-version-check --wheel-dir /wheels .

# --- runtime ----------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE}
ARG ETRND_UID=10001

LABEL org.opencontainers.image.title="etrnd" \
      org.opencontainers.image.description="Send SMTP ETRN to the ISP's relays when the WAN link comes up" \
      org.opencontainers.image.licenses="MIT"

# The wheels are bind-mounted, not copied, so they never become an image layer. pip and
# setuptools go afterwards: nothing installs anything at run time, and less code is less to
# patch. The group gets the same number as the user (useradd --system would pick one below
# 1000), so USER, the files and compose's tmpfs uid/gid all agree.
# /run/etrnd is the control socket's directory, owned by the daemon's user so it
# works even without the tmpfs that compose.yaml mounts there. /var/lib/etrnd holds the state
# file (each relay's last success and failure, docs/status.md): mount a volume there to keep
# it across re-created containers; on a read-only root without one, etrnd says once that it
# cannot save it and works on.
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-cache-dir --disable-pip-version-check --root-user-action=ignore \
        --no-index --find-links=/wheels /wheels/etrnd-*.whl \
    && pip uninstall --yes --disable-pip-version-check --root-user-action=ignore \
        pip setuptools wheel \
    && groupadd --system --gid "${ETRND_UID}" etrnd \
    && useradd --system --uid "${ETRND_UID}" --gid etrnd --no-create-home --no-log-init \
        --home-dir /nonexistent --shell /usr/sbin/nologin etrnd \
    && install -d -m 0755 /etc/etrnd \
    && install -d -o etrnd -g etrnd -m 0750 /run/etrnd /var/lib/etrnd

# The daemon's default config path anyway; set so `docker exec ... etrnd status` finds the same
# file (and so the control socket path in it). A bare `password_file:` name is looked up in
# $CREDENTIALS_DIRECTORY: here, where `-v ...:/run/secrets/NAME` and compose's secrets put
# files. Byte code was compiled at install time and the root file system is meant to be
# read-only. Unbuffered: each log line reaches `docker logs` when it happens.
ENV ETRND_CONFIG=/etc/etrnd/etrnd.yaml \
    CREDENTIALS_DIRECTORY=/run/secrets \
    STATE_DIRECTORY=/var/lib/etrnd \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

# Numeric, so runtimes can check "non-root" without reading /etc/passwd.
USER 10001:10001

# Python is PID 1 here. That is fine without tini: the daemon installs its own SIGTERM/SIGINT/
# SIGHUP/SIGUSR1 handlers (PID 1 gets no default signal actions, but handled signals work),
# it starts no child processes, and `docker exec` processes such as the health check are
# reaped by the runtime, not by PID 1. SIGTERM makes it close SMTP sessions and exit 0.
STOPSIGNAL SIGTERM

# `etrnd check` (Nagios rules, docs/status.md): 0 OK = healthy; 1 WARNING / 2 CRITICAL (a relay's
# round unaccepted for health.warning_after / critical_after of link-up time, or a failed
# reload) and 3 UNKNOWN (no daemon) count as failed checks: unhealthy after 3 in a row.
HEALTHCHECK --interval=30s --timeout=10s --start-period=15s --retries=3 \
    CMD ["etrnd", "check"]

ENTRYPOINT ["etrnd"]
CMD ["run"]
