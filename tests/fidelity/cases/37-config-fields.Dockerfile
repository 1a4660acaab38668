FROM busybox:latest
LABEL org.example.name="fidelity" version=1
EXPOSE 80 443/udp
VOLUME ["/data", "/logs"]
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=30s --timeout=5s --retries=3 CMD ["true"]
ENV MODE=prod
WORKDIR /srv/app
USER 65534
ENTRYPOINT ["/bin/sh", "-c"]
CMD ["echo hi"]
