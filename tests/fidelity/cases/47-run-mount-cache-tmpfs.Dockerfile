FROM busybox:latest
RUN --mount=type=cache,target=/var/cache/x --mount=type=tmpfs,target=/scratch echo hi > /var/cache/x/f && echo t > /scratch/t && echo done > /done
