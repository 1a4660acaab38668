FROM busybox:latest
RUN rm /etc/group && rm -rf /home
