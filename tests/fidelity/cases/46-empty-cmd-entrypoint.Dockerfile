FROM busybox:latest AS base
CMD ["x"]
ENTRYPOINT ["y"]
FROM base
CMD []
ENTRYPOINT [ ]
