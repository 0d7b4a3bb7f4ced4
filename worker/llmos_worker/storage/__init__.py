"""Model storage: fetching, digests, envelope encryption."""
