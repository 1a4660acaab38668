FROM busybox:latest
RUN echo x > /w
WORKDIR /w
RUN pwd > /pwd
