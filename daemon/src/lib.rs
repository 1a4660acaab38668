//! lcached, the lcache daemon: step records, blobs, context index and the HTTP API.
