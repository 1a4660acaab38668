FROM busybox:latest
ADD archive.tar /x/
