FROM busybox:latest
COPY a.txt b.txt run.sh private.txt /m/
