FROM busybox:latest
COPY --chmod=0750 f.txt /f
COPY --chmod=640 dir /cd/
