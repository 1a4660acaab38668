FROM busybox:latest
WORKDIR /tmp
RUN touch in-tmp
