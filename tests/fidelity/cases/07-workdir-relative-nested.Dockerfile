FROM busybox:latest
WORKDIR a
WORKDIR b
RUN pwd > here
WORKDIR /abs/c
RUN pwd > here
