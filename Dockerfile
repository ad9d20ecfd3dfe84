# letterbox in a container: build with the Rust toolchain, run on a slim
# Debian as an unprivileged user. docker-compose.yml wires it to a database.

FROM rust:1.95-bookworm AS builder
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY migrations ./migrations
RUN cargo build --release --locked --bin letterbox

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --home-dir /var/lib/letterbox --shell /usr/sbin/nologin letterbox \
    && mkdir -p /var/lib/letterbox /var/mail/letterbox /etc/letterbox \
    && chown letterbox:letterbox /var/lib/letterbox /var/mail/letterbox
COPY --from=builder /src/target/release/letterbox /usr/local/bin/letterbox
COPY config/letterbox.toml /etc/letterbox/letterbox.toml.example
# Inside a container the listeners must face the container's network, and
# mail and the SQLite fallback live on volumes; a mounted
# /etc/letterbox/letterbox.toml or LETTERBOX_… variables override these.
ENV LETTERBOX_SMTP__LISTEN='["0.0.0.0:2525"]' \
    LETTERBOX_SINK__HTTP_LISTEN=0.0.0.0:8025 \
    LETTERBOX_MAILDIR__ROOT=/var/mail/letterbox \
    LETTERBOX_DATABASE__URL=sqlite:///var/lib/letterbox/letterbox.db
USER letterbox
WORKDIR /var/lib/letterbox
# SMTP (publish as 25) and the sink's web page.
EXPOSE 2525 8025
HEALTHCHECK --interval=30s --timeout=10s CMD ["/usr/local/bin/letterbox", "check"]
CMD ["/usr/local/bin/letterbox", "serve"]
