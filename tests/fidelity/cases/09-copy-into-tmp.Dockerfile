FROM busybox:latest
COPY f.txt /tmp/
