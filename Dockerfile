# event-router container image.
#   docker build -t event-router .      (or: buildah bud --format docker -t event-router .)
#   docker run --rm -e RABBITMQ_URL=amqp://guest:guest@broker:5672/ event-router
# HEALTHCHECK needs the Docker image format (buildah/podman: --format docker).

# --- build -------------------------------------------------------------------
FROM debian:bookworm AS build
ARG JOBS=2
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      build-essential cmake pkg-config \
      librabbitmq-dev libssl-dev libboost-dev rapidjson-dev libyaml-cpp-dev libsqlite3-dev libpq-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# Only what the build and `cmake --install` read (keeps the layer cache warm
# when tests or docs change); the READMEs, only installed, after the compile.
COPY CMakeLists.txt ./
COPY include/ include/
COPY src/ src/
# The Node worker helper's installed files only (its tests would bust the cache).
COPY clients/node/package.json clients/node/index.js clients/node/index.d.ts clients/node/
COPY plugins/ plugins/
COPY config/ config/
COPY systemd/ systemd/
COPY packaging/ packaging/
COPY clients/python/event_router/ clients/python/event_router/
RUN cmake -S . -B /build -DCMAKE_BUILD_TYPE=Release -DCMAKE_INSTALL_PREFIX=/usr -DER_BUILD_TESTS=OFF \
 && cmake --build /build -j"${JOBS}"
COPY README.md ./
COPY clients/node/README.md clients/node/
RUN DESTDIR=/out cmake --install /build --strip \
 && rm -rf /out/usr/include /out/usr/lib/systemd
# Image config: HTTP endpoint for the HEALTHCHECK, state in the volume.
COPY docker/router.yaml /out/etc/event-router/router.yaml

# --- runtime -----------------------------------------------------------------
FROM debian:bookworm-slim
# Runtime libraries (from `ldd event-router` and `ldd libhttp_plugin.so`;
# libssl3 is also our libcrypto and librabbitmq4's, named here for the http
# plugin's https), CA certificates for amqps:// and https://, python3 for the
# example handlers (rag_worker.py runs on the event_router package, installed
# in /usr/lib/python3/dist-packages).
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      librabbitmq4 libssl3 libyaml-cpp0.7 libsqlite3-0 libpq5 libstdc++6 ca-certificates python3 \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/log/apt /var/log/dpkg.log
RUN groupadd --gid 10001 event-router \
 && useradd --uid 10001 --gid 10001 --home-dir /var/lib/event-router --no-create-home --no-log-init \
      --shell /usr/sbin/nologin event-router \
 && install -d -o 10001 -g 10001 -m 0750 /var/lib/event-router
COPY --from=build /out/ /

ENV RABBITMQ_URL=amqp://guest:guest@rabbitmq:5672/ \
    RABBITMQ_EXCHANGE=draft-genie.events \
    SPEAKER_QUEUE=speaker.events \
    DRAFT_QUEUE=draft.events \
    RAG_QUEUE=rag.events \
    EVALUATION_QUEUE=evaluation.events \
    EVENT_ROUTER_LOG_LEVEL=info
VOLUME ["/var/lib/event-router"]
WORKDIR /var/lib/event-router
EXPOSE 9090
USER 10001:10001
STOPSIGNAL SIGTERM
# Reads /etc/event-router/router.yaml (or $EVENT_ROUTER_CONFIG) for http.listen.
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
  CMD ["event-router", "health", "--ready"]
# No init such as tini: as PID 1 the daemon reaps every orphan itself, with
# the same code that reaps them as a child subreaper outside a container, and
# it handles SIGTERM/SIGINT/SIGHUP itself (no forwarding needed).
ENTRYPOINT ["event-router"]
CMD ["--config", "/etc/event-router/router.yaml"]
