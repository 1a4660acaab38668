FROM busybox:latest
RUN echo 'app:x:1000:1000::/home/app:/bin/sh' >> /etc/passwd && echo 'app:x:1000:' >> /etc/group && mkdir -p /home/app && chown app:app /home/app
USER app
RUN id > /home/app/id && touch /tmp/app-file
