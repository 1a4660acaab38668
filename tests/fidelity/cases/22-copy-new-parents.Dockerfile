FROM busybox:latest
COPY f.txt /a/b/c/
