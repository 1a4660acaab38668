FROM busybox:latest AS base
CMD ["base-cmd"]
FROM base
ENTRYPOINT ["/bin/echo"]
