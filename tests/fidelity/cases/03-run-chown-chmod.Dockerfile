FROM busybox:latest
RUN touch /f && chown 65534:65534 /f && chmod 4755 /f && mkdir -m 2775 /sgid && touch /sgid/x
