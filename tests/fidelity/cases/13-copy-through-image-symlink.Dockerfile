FROM busybox:latest
RUN mkdir -p /var/data && ln -s /var/data /data
COPY f.txt /data/
