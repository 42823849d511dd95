"""Registries: the modes and governance policies a runtime knows (built from compiled specs), the protocol
profile, and the archive of spec texts. Above the spec compiler, below the kernel."""
