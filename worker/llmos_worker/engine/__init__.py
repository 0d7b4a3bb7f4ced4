"""Paged-memory inference engine: sequences, block manager, scheduler, sampler, engine."""
