FROM busybox:latest
SHELL ["/bin/sh", "-ec"]
CMD echo shell form
HEALTHCHECK NONE
