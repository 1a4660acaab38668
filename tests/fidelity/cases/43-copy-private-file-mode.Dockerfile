FROM busybox:latest
COPY private.txt run.sh /keep/
