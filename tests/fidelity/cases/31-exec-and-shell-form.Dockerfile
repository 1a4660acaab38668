FROM busybox:latest
RUN ["/bin/sh", "-c", "echo exec > /exec"]
SHELL ["/bin/sh", "-ec"]
RUN echo shell > /shell
