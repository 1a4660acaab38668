FROM busybox:latest
RUN mkdir -m 0700 /srv && chown 65534:65534 /srv
COPY f.txt /srv/
