FROM busybox:latest
COPY --chown=65534:65534 f.txt /p/q/
