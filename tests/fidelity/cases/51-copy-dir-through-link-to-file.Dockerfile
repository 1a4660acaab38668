FROM busybox:latest
RUN mkdir -p /app && echo f > /realfile && ln -s /realfile /app/d
COPY dir /app/d/
