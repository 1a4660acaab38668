FROM busybox:latest
RUN echo 'app:x:1000:1000::/home/app:/bin/sh' >> /etc/passwd && echo 'app:x:1000:' >> /etc/group
USER app
WORKDIR /w
RUN pwd > /w/pwd
