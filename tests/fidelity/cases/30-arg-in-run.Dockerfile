FROM busybox:latest
ARG V=default
ARG W
RUN echo "v=$V w=$W" > /args
