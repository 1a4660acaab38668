FROM busybox:latest
WORKDIR /app
RUN --mount=type=bind,source=dir,target=/mnt/dir cp -a /mnt/dir /copied && cat /mnt/dir/sub/two.txt > /two
RUN --mount=type=bind,target=/ctx,rw sh -c 'echo x > /ctx/written && ls -A /ctx > /ctx-listing'
RUN --mount=type=bind,source=private.txt,target=/etc/private.txt cp -p /etc/private.txt /private-copy
RUN --mount=type=bind,source=linkdir,target=rel cat rel/one.txt > /via-link
