FROM busybox:latest
COPY . /ctx/
