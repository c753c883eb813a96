"""The Ray Serve application: HTTP API over the shard pool."""
