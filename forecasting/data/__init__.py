"""Data: sources, schema-conformed readers, the built-in simulator, stores, observations, torch datasets."""
