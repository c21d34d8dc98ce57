# Builds roost and the example personas, then runs `roost run` with them.
#
#   docker build -t roost .
#   docker run --rm -v roost-state:/var/lib/roost roost
#
# Mount your own personas at /srv/roost/plugins and a roost.toml at
# /etc/roost/roost.toml to run something else. Keys: pass them as environment
# variables named in roost.toml (api_key_env), or mount files (api_key_file).

FROM rust:1.95-bookworm AS build
RUN rustup target add wasm32-wasip2
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p roost \
 && ./target/release/roost build plugins/echo \
 && ./target/release/roost build plugins/greeter

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --home /var/lib/roost --create-home roost
COPY --from=build /src/target/release/roost /usr/local/bin/roost
COPY --from=build /src/plugins/*.wasm /srv/roost/plugins/
USER roost
VOLUME /var/lib/roost
EXPOSE 9090
ENTRYPOINT ["roost", "run", "--plugins", "/srv/roost/plugins", "--state", "/var/lib/roost", "--metrics", "0.0.0.0:9090"]
