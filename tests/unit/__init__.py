"""Vocabulary, mode specs and hooks, the spec compiler, registries and storage, each in isolation."""
