FROM busybox:latest
RUN echo x > /a && ln /a /b && ln -s /nonexistent /dangling && ln -s a /rel
