"""What needs a real server process: crash and restart, signals, exit status, CLI output, start-up checks."""
