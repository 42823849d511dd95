"""Application: configuration, the daemon (`server`), the command line, the operator CLIs and the browser
console. The only layer that wires the others together."""
