FROM busybox:latest
RUN mkdir -p /elsewhere /app/d && ln -s /elsewhere /app/d/sub
COPY dir /app/d/
