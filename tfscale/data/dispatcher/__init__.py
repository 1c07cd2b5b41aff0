"""The shard dispatcher: leases input shards to workers over gRPC."""
