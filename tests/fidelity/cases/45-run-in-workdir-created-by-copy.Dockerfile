FROM busybox:latest
COPY f.txt /made/by/copy/
WORKDIR /made/by
RUN ls > listing && pwd > pwd
