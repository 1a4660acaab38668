FROM busybox:latest
COPY dir /dst
