FROM busybox:latest
RUN echo 'app:x:1000:1000::/home/app:/bin/sh' >> /etc/passwd && echo 'app:x:1000:' >> /etc/group
COPY --chown=app:app f.txt /owned.txt
COPY --chown=app dir /owned-dir/
