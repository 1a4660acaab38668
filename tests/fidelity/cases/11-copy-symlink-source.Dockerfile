FROM busybox:latest
COPY link.txt /x.txt
