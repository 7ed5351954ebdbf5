# syntax=docker/dockerfile:1
# One image for every Esplanade service: `esplanade serve keyexchange|dataplane|policy|api`.
# Build from the repository root: docker build -t esplanade/esplanade:0.1.0 .

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- builder: compile wheels (the package's C extension needs gcc and the OpenSSL headers) ---
FROM ${PYTHON_IMAGE} AS builder
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev libssl-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md constraints.txt ./
COPY lib ./lib
COPY services ./services
# Wheels for the package and every pinned dependency, then a self-contained venv from them.
RUN pip wheel --no-cache-dir --constraint constraints.txt --wheel-dir /wheels . \
 && python -m venv /opt/esplanade \
 && /opt/esplanade/bin/pip install --no-cache-dir --no-index --find-links /wheels esplanade

# --- runtime: the venv and the shared libraries it links against, no compiler ---
FROM ${PYTHON_IMAGE} AS runtime
RUN apt-get update \
 && apt-get install -y --no-install-recommends libssl3 ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 esplanade \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin esplanade \
 && install -d -o 10001 -g 10001 -m 0750 /var/lib/esplanade
COPY --from=builder /opt/esplanade /opt/esplanade
ENV PATH=/opt/esplanade/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
# Non-root by default; the Helm chart runs only the dataplane as UID 0 (it needs NET_ADMIN).
USER 10001:10001
WORKDIR /var/lib/esplanade
# gRPC: keyexchange 50061, dataplane 50062, policy 50063 (metrics +1000); api HTTP 8080;
# the dataplane's IKE and NAT-T.
EXPOSE 8080 50061 50062 50063 51061 51062 51063 500/udp 4500/udp
ENTRYPOINT ["esplanade"]
CMD ["serve", "api"]
