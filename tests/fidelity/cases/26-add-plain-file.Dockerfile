FROM busybox:latest
ADD f.txt /z.txt
ADD dir /added-dir/
