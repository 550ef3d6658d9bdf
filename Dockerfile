# syntax=docker/dockerfile:1.7
# carewall gateway image: build the binary, fetch ONNX Runtime from its PyPI
# wheel (as scripts/setup.sh does), then a slim runtime that holds only the
# binary, libonnxruntime.so, the shipped model, config and policies, run as a
# non-root user.
#
#   docker build -t carewall:local .
#   docker run --rm -p 8080:8080 -e CAREWALL__UPSTREAM__BASE_URL=... carewall:local
#
# linux/amd64 only: the ONNX Runtime wheel fetched is manylinux x86_64.

ARG RUST_VERSION=1.95
ARG DEBIAN_RELEASE=bookworm

# ---------------------------------------------------------------- build
FROM rust:${RUST_VERSION}-${DEBIAN_RELEASE} AS build
WORKDIR /src
COPY . .
# Registry and target caches survive between builds with BuildKit; the
# binary is copied out because a cache mount is not part of the layer.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin carewall \
 && install -D -m 0755 target/release/carewall /out/carewall

# ---------------------------------------------------------------- onnxruntime
# The same script and pinned version the developers use, so the image and
# the test machines run one ONNX Runtime build.
FROM python:3.11-slim-${DEBIAN_RELEASE} AS onnxruntime
WORKDIR /ort
COPY scripts/setup.sh scripts/setup.sh
RUN bash scripts/setup.sh \
 && install -D -m 0644 .cache/onnxruntime/libonnxruntime.so /out/libonnxruntime.so

# ---------------------------------------------------------------- runtime
FROM debian:${DEBIAN_RELEASE}-slim AS runtime
# curl: only for HEALTHCHECK. The gateway itself needs no CA bundle (it
# carries webpki roots) and no OpenSSL.
RUN apt-get update \
 && apt-get install -y --no-install-recommends curl \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 carewall \
 && useradd --system --uid 10001 --gid carewall --home-dir /opt/carewall --shell /usr/sbin/nologin carewall \
 && install -d -o carewall -g carewall -m 0750 /var/lib/carewall

COPY --from=build /out/carewall /usr/local/bin/carewall
COPY --from=onnxruntime /out/libonnxruntime.so /usr/local/lib/libonnxruntime.so
# Relative paths in the config (`models/carewall-safety`, `policies`)
# resolve against the working directory /opt/carewall.
WORKDIR /opt/carewall
COPY models/carewall-safety/ models/carewall-safety/
COPY policies/ policies/
COPY config/ config/
COPY config/carewall.toml /etc/carewall/carewall.toml

ENV ORT_DYLIB_PATH=/usr/local/lib/libonnxruntime.so \
    CAREWALL__SERVER__LISTEN=0.0.0.0:8080 \
    CAREWALL__AUDIT__URL=sqlite:///var/lib/carewall/audit.db
# Audit database (SQLite default); use a volume or a postgres:// URL.
VOLUME ["/var/lib/carewall"]

USER carewall:carewall
EXPOSE 8080
# /readyz answers 200 once the model is loaded and the upstream configured;
# the start period covers model loading.
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD curl -fsS http://127.0.0.1:8080/readyz || exit 1

ENTRYPOINT ["/usr/local/bin/carewall"]
CMD ["serve", "--config", "/etc/carewall/carewall.toml"]
