FROM busybox:latest AS build
RUN mkdir -p /out/bin && echo built > /out/bin/artifact && ln -s artifact /out/bin/link && chmod 0700 /out/bin/artifact
FROM busybox:latest
COPY --from=build /out /opt/
COPY --from=build /out/bin/link /linked
