# roost and the example personas (echo, greeter) in a small image that runs `roost run`.
#
#   docker build -t roost .
#   docker run --rm -v roost-state:/var/lib/roost roost
#
# - Configuration: /etc/roost/roost.toml (ROOST_CONFIG names it). The image has a
#   minimal one (deploy/container.toml); mount your own over it with
#   -v ./roost.toml:/etc/roost/roost.toml:ro. Every key is documented in roost.toml.
# - Personas: /srv/roost/plugins holds echo and greeter; mount a folder of NAME.wasm
#   there to run others. State (identities, outbox, KV, compile cache): the volume
#   /var/lib/roost.
# - Any flag can be given as its ROOST_* variable instead (`roost run --help`), e.g.
#   -e ROOST_SERVER=https://chat.internal. (Plain http:// to a host that is not loopback
#   is refused unless -e ROOST_INSECURE=1.) A variable beats the file, so the file
#   alone decides what the image leaves unset (such as [telemetry] metrics).
# - Metrics and /healthz listen on 127.0.0.1:9090 inside the container, where the
#   HEALTHCHECK reaches them. To publish them, set [telemetry] metrics =
#   "0.0.0.0:9090" in your roost.toml (or -e ROOST_METRICS=0.0.0.0:9090) and -p 9090:9090;
#   keep port 9090 or change the HEALTHCHECK too.
# - Keys: environment variables named in roost.toml (api_key_env), or mounted files
#   (api_key_file). Never bake them into an image.
# - The binary is stripped; its debug info is split off into /src/roost.debug in the
#   `build` stage (docker build --target build, then docker cp) for symbolising a
#   crash report.

# ---- example personas: rebuilt only when wit/ or plugins/ change
FROM rust:1.95-bookworm AS personas
RUN rustup target add wasm32-wasip2
WORKDIR /src
COPY wit wit
COPY plugins plugins
RUN cd plugins \
 && cargo build --release --locked --target wasm32-wasip2 -p echo -p greeter \
 && mkdir /personas \
 && cp target/wasm32-wasip2/release/echo.wasm target/wasm32-wasip2/release/greeter.wasm /personas/

# ---- the host
FROM rust:1.95-bookworm AS build
WORKDIR /src
# Keep the line tables in the build so objcopy can split them off below.
ENV CARGO_PROFILE_RELEASE_STRIP=none
# Dependencies first, in their own layer: compiled against stub sources for every
# target host/Cargo.toml names, so editing roost's code does not rebuild wasmtime.
COPY Cargo.toml Cargo.lock ./
COPY host/Cargo.toml host/
RUN mkdir -p host/src \
 && sed -n 's/^path = "\(.*\)"$/\1/p' host/Cargo.toml | while read -r p; do \
      mkdir -p "host/$(dirname "$p")" && echo 'fn main() {}' > "host/$p"; \
    done \
 && cargo build --release --locked -p roost --bin roost \
 && rm -rf host/src host/benches tests target/release/.fingerprint/roost-*
COPY . .
RUN cargo build --release --locked -p roost --bin roost \
 && objcopy --only-keep-debug target/release/roost roost.debug \
 && objcopy --strip-debug --add-gnu-debuglink=roost.debug target/release/roost roost

# ---- the image
FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --user-group --home-dir /var/lib/roost --no-create-home roost \
 && install -d -o roost -g roost -m 0700 /var/lib/roost
COPY --from=build /src/roost /usr/local/bin/roost
COPY --from=personas /personas/ /srv/roost/plugins/
COPY deploy/container.toml /etc/roost/roost.toml
ENV ROOST_CONFIG=/etc/roost/roost.toml \
    ROOST_PLUGINS=/srv/roost/plugins \
    ROOST_STATE=/var/lib/roost
USER roost
WORKDIR /var/lib/roost
VOLUME /var/lib/roost
EXPOSE 9090
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
  CMD ["roost", "status", "--health", "--addr", "127.0.0.1:9090"]
# SIGTERM (docker stop) finishes messages in flight and flushes outboxes.
STOPSIGNAL SIGTERM
ENTRYPOINT ["roost"]
CMD ["run"]
