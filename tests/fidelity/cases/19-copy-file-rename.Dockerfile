FROM busybox:latest
COPY f.txt /newname
