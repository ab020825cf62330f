# Prometheus for the compose test only (deploy/docker-compose.test.yml): Debian's package on the
# test's local base image, since no registry is reachable there. Users run prom/prometheus.
ARG BASE_IMAGE
FROM ${BASE_IMAGE}
RUN apt-get update -q \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus wget \
    && rm -rf /var/lib/apt/lists/* \
    && mkdir -p /prometheus && chown prometheus:prometheus /prometheus
USER prometheus
WORKDIR /prometheus
EXPOSE 9090
ENTRYPOINT ["/usr/bin/prometheus"]
