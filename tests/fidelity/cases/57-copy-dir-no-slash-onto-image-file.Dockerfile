FROM busybox:latest
RUN mkdir -p /app && echo x > /app/d
COPY dir /app/d
