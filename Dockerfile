# syntax=docker/dockerfile:1
# infergate's container image: the release `infergate` binary alone, as a non-root user, on
# distroless/cc (glibc and libgcc, which is all the binary links; no shell, no package manager).
#   docker build -t infergate:0.1.0 .
#   docker run --rm -p 8080:8080 -v "$PWD/myconf:/etc/infergate/config:ro" infergate:0.1.0
# (myconf/infergate.yaml listening on 0.0.0.0:8080; append --check to validate it instead)
# Kubernetes: deploy/ and docs/deploy-kubernetes.md. scripts/check-deploy.sh lints this file.

# The version in rust-toolchain.toml.
ARG RUST_VERSION=1.95.0

# bookworm: the same Debian 12 (glibc 2.36) as the runtime image below.
FROM rust:${RUST_VERSION}-bookworm AS builder
# cmake: Pingora's zlib-ng is built from source.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends cmake \
 && rm -rf /var/lib/apt/lists/*
# The image's toolchain, without the rustfmt and clippy that rust-toolchain.toml adds for
# development: nothing to download at build time but crates.
ARG RUST_VERSION
ENV RUSTUP_TOOLCHAIN=${RUST_VERSION} \
    CARGO_PROFILE_RELEASE_STRIP=debuginfo \
    CARGO_TERM_COLOR=never
WORKDIR /src
COPY . .
# The caches keep crates and build outputs between builds; the binary is copied out of them.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin infergate \
 && install -D -m 0755 target/release/infergate /out/usr/local/bin/infergate \
 && install -d -m 0755 /out/var/lib/infergate /out/etc/infergate/config /out/etc/infergate/secrets

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=builder /out/usr/local/bin/infergate /usr/local/bin/infergate
COPY --from=builder --chown=65532:65532 /out/var/lib/infergate /var/lib/infergate
COPY --from=builder /out/etc/infergate /etc/infergate
# limits.data_dir and relative paths in the config land here (as WorkingDirectory= in
# systemd/infergate.service); Kubernetes mounts an emptyDir on it.
WORKDIR /var/lib/infergate
# distroless' "nonroot"; numeric, so runAsNonRoot can verify it.
USER 65532:65532
# 8080: clients (server.listen). 9100: /metrics and the status pages (server.metrics_listen).
EXPOSE 8080 9100
# Exec form: infergate is PID 1 and gets SIGTERM itself (graceful drain) and SIGHUP (reload).
ENTRYPOINT ["/usr/local/bin/infergate", "--config", "/etc/infergate/config/infergate.yaml"]
