FROM busybox:latest
RUN rm -rf /var && mkdir -m 0750 /var && touch /var/new
