# refund-worker's container images.
#
#   docker build -t refund-worker .                      # the product (default target)
#   docker build --target sandbox -t refund-sandbox .    # the provider sandbox (local use only)
#
# Needs BuildKit (Docker's default builder since 23.0): it builds only the
# stages the chosen target needs, so the product build never compiles the
# sandbox and the other way round.
#
# Base images are pinned to exact version tags. They are not pinned by
# digest because digests cannot be looked up from the machine this file was
# written on (no registry access there); a release pipeline should resolve
# each tag once and append `@sha256:...` to it.
#
# - rust:1.95.0-bookworm: the toolchain the project is built and tested with
#   (rustc 1.95.0; Cargo.toml's rust-version is the minimum, 1.92). The full
#   image, not -slim: tikv-jemalloc-sys needs make and a C toolchain.
# - debian:12.11-slim: the same Debian release (bookworm) as the build
#   stage, so the binary finds the glibc it was linked against.

# ---------------------------------------------------------------------------
# cargo-chef: builds the dependencies from a recipe (the manifests, the lock
# file and .cargo/config.toml) in a layer of its own, which stays cached
# until a manifest or Cargo.lock changes; editing src/ only rebuilds our own
# crates.
FROM rust:1.95.0-bookworm AS chef
RUN cargo install cargo-chef --locked --version 0.1.77 \
    && rm -rf "$CARGO_HOME/registry"
WORKDIR /src

# The recipe: computed from the whole source tree, but its content (and so
# the next stage's cache key) changes only with the manifests.
FROM chef AS planner
COPY . .
RUN cargo chef prepare --recipe-path recipe.json

# The product's dependencies. The recipe holds skeletons of the workspace
# members only (the root package and crates/*); the crates that
# [patch.crates-io] takes from vendor/ (sled, lapin) are path packages
# outside the workspace, so vendor/ is copied whole before cooking: they are
# real dependencies and are built (and cached) here with the others.
# .cargo/config.toml carries JEMALLOC_SYS_WITH_MALLOC_CONF, which
# tikv-jemalloc-sys reads at build time: it must be there when the allocator
# is built, or the binary would get jemalloc's default options.
FROM chef AS deps
COPY --from=planner /src/recipe.json recipe.json
COPY .cargo/ .cargo/
COPY vendor/ vendor/
RUN cargo chef cook --release --locked --recipe-path recipe.json \
      --package refund-worker --bin refund-worker

# The product binary only: not the sandbox (package refund-sandbox), not the
# fuzz targets (fuzz/, a workspace of its own).
FROM deps AS build
COPY . .
RUN cargo build --release --locked --package refund-worker --bin refund-worker

# The sandbox's dependencies on top of the product's (mostly the same
# crates), then the sandbox binary.
FROM deps AS sandbox-build
RUN cargo chef cook --release --locked --recipe-path recipe.json \
      --package refund-sandbox --bin refund-sandbox
COPY . .
RUN cargo build --release --locked --package refund-sandbox --bin refund-sandbox

# ---------------------------------------------------------------------------
# What both runtime images share: Debian slim and an unprivileged user with
# a fixed numeric uid/gid (10001), so that Kubernetes' runAsNonRoot can
# check it and volumes can be given to it with fsGroup.
#
# No ca-certificates: every TLS client in the binary uses rustls with the
# Mozilla roots compiled in (webpki-roots): lapin with
# `rustls-webpki-roots-certs`, reqwest with `rustls-tls` (webpki roots),
# PostgreSQL through tokio-postgres-rustls with webpki_roots (see
# src/store/postgres/setup.rs); nothing links rustls-native-certs or
# OpenSSL (Cargo.lock). A private CA is given as a PEM file instead:
# amqp.tls_ca_path, store.postgres.tls_ca_path.
# No curl: the health check is the binary's own `refund-worker health`.
FROM debian:12.11-slim AS runtime-base
RUN groupadd --gid 10001 refund-worker \
    && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
         --shell /usr/sbin/nologin refund-worker

# The provider sandbox, for local runs and tests (docker-compose.yml); never
# deployed next to a real worker.
FROM runtime-base AS sandbox
COPY --from=sandbox-build /src/target/release/refund-sandbox /usr/local/bin/refund-sandbox
USER 10001:10001
EXPOSE 8090
ENTRYPOINT ["/usr/local/bin/refund-sandbox"]
CMD ["--addr", "0.0.0.0:8090"]

# ---------------------------------------------------------------------------
# The product image (the default target: the last stage).
FROM runtime-base AS runtime
# The dedupe store must outlive the container: a store left in the writable
# layer is lost when the container is recreated, and every later copy of an
# old refund would be paid again. So the store path points into a declared
# volume by default (Docker creates an anonymous volume when none is
# mounted; mount a named one, or a PersistentVolume in Kubernetes). The
# directory is created here, owned by the worker's user, so that a new
# named volume starts with that ownership.
RUN install -d -o 10001 -g 10001 -m 0750 /var/lib/refund-worker
ENV REFUND_WORKER__STORE__PATH=/var/lib/refund-worker/store \
    REFUND_WORKER__HTTP__ADDR=0.0.0.0:8080 \
    REFUND_WORKER__HTTP__CALLBACK_ADDR=0.0.0.0:8081
VOLUME ["/var/lib/refund-worker"]
COPY --from=build /src/target/release/refund-worker /usr/local/bin/refund-worker
USER 10001:10001
WORKDIR /var/lib/refund-worker
# 8080: the private listener (/healthz, /readyz, /metrics, the operator API
# and console; never publish it to the internet). 8081: provider callbacks
# only (the listener that faces the internet through an ingress).
EXPOSE 8080 8081
# `refund-worker health` asks /readyz on http.addr (127.0.0.1 when it listens
# on every address) and exits 0 when ready, 1 otherwise: no shell, no curl.
# start-period covers opening a large store.
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
    CMD ["/usr/local/bin/refund-worker", "health"]
# SIGTERM starts the graceful stop: no new deliveries, in-flight refunds get
# up to 30 s (DRAIN_DEADLINE in src/service/app.rs), then the store is flushed.
# Give the container more than that before it is killed (compose:
# stop_grace_period; Kubernetes: terminationGracePeriodSeconds). The worker
# handles SIGTERM itself and starts no child processes, so it runs as PID 1
# without an init.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/refund-worker"]
CMD ["run"]
