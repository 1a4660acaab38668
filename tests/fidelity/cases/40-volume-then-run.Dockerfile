FROM busybox:latest
VOLUME /v
RUN mkdir -p /v && touch /v/x
