FROM busybox:latest
RUN mkdir -p /app && ln -s /nothere /app/d
COPY dir /app/d/
