FROM busybox:latest
ADD archive.tar.gz /y/
