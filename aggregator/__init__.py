"""The aggregator: a long-running gRPC service that runs federated rounds."""
