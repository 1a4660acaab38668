FROM busybox:latest
COPY *.txt /dst/
