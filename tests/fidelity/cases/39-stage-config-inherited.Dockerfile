FROM busybox:latest AS base
ENV X=from-base
WORKDIR /srv
USER 65534
FROM base
RUN pwd > /tmp/pwd && id -u > /tmp/uid && echo $X > /tmp/x
