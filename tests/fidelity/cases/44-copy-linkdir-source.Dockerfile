FROM busybox:latest
COPY linkdir /via-link/
