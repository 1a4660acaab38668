FROM busybox:latest
USER 65534:65534
RUN id > /tmp/id && touch /tmp/nobody-was-here
