# Builds the refund-worker binary (worker, sandbox and tools in one).
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin refund-worker

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/refund-worker /usr/local/bin/refund-worker
WORKDIR /app
ENTRYPOINT ["refund-worker"]
CMD ["run"]
