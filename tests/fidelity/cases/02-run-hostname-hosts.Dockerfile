FROM busybox:latest
RUN hostname > /hostname && cat /etc/hosts > /hosts.seen && ls /etc > /etc-listing
