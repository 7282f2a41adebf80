"""Response cache: canonical keys, entries, stores and single-flight coalescing."""
