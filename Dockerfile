# Multi-stage build of the dshare node.
FROM rust:1.88-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p dshare

FROM debian:bookworm-slim
# A fixed uid/gid, so private files (mode 0600) on the host can be given to it: see README
# "Cluster with Docker".
RUN groupadd --system --gid 10001 dshare \
 && useradd --system --uid 10001 --gid 10001 --home /var/lib/dshare --create-home dshare
COPY --from=build /src/target/release/dshare /usr/local/bin/dshare
USER dshare
VOLUME ["/var/lib/dshare"]
EXPOSE 25 110 995 4069
ENTRYPOINT ["/usr/local/bin/dshare"]
CMD ["serve", "--config", "/etc/dshare/node.toml"]
