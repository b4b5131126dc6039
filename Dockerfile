# syntax=docker/dockerfile:1
#
# xraytwisted: the AWS X-Ray daemon on UDP and TCP 0.0.0.0:2000, as a non-root user.
#
#   docker build -t xraytwisted .
#   docker run --rm -p 2000:2000/udp -p 2000:2000/tcp -e AWS_REGION=us-east-2 \
#       -e AWS_ACCESS_KEY_ID -e AWS_SECRET_ACCESS_KEY -e AWS_SESSION_TOKEN xraytwisted
#   docker run --rm -p 2000:2000/udp -p 2000:2000/tcp xraytwisted --local-sink -   # no AWS
#
# Arguments after the image name are added to the ENTRYPOINT's flags (the
# last value of a flag wins, as with the Go daemon's image).  The daemon
# drains for up to --shutdown-timeout (20 s) on SIGTERM: give `docker stop`
# more than that (-t 30), or lower it.  See docs/operations.md.

# Build the wheel in a throw-away stage so the image holds no build tools.
FROM python:3.11.14-slim-bookworm AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM python:3.11.14-slim-bookworm
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
RUN useradd --system --uid 10001 --user-group --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin xray
# The wheel is mounted for the install only, so no copy of it stays in a layer.
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-cache-dir /wheels/*.whl
# Numeric, so Kubernetes' runAsNonRoot can check it (uid 10001 is "xray").
USER 10001:10001
EXPOSE 2000/udp 2000/tcp
# Asks GET /health where the daemon listens: the TCP port (127.0.0.1 reaches
# the 0.0.0.0 below), or what a cfg.yaml mounted at /etc/amazon/xray/cfg.yaml
# says. With another -t in `docker run` arguments, give the same one with
# --health-cmd "xray --health-check -t ...".
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["xray", "--health-check"]
ENTRYPOINT ["xray", "-t", "0.0.0.0:2000", "-b", "0.0.0.0:2000"]
