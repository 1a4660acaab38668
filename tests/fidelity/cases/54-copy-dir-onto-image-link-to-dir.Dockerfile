FROM busybox:latest
RUN mkdir -p /real /app && ln -s /real /app/d
COPY dir /app/d/
