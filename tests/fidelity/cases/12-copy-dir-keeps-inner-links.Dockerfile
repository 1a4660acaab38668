FROM busybox:latest
COPY dir /d/
