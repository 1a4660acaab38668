FROM busybox:latest
COPY --chown=65534:65534 dir /d/
