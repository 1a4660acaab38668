FROM busybox:latest
RUN mkdir -p /app && echo x > /app/f
COPY a.txt /app/f/b.txt
