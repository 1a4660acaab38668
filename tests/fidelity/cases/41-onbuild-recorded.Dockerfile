FROM busybox:latest
ONBUILD RUN touch /onbuild-ran
ONBUILD ENV TRIGGERED=1
