FROM busybox:latest
ENV PATH=/opt/bin:$PATH A=1
ENV B=${A}2 C="with space"
RUN echo "$PATH $A $B $C" > /env-seen
