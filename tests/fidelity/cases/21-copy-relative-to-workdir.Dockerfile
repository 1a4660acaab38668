FROM busybox:latest
WORKDIR /app
COPY f.txt .
COPY dir sub/
