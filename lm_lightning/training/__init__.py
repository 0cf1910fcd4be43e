"""What keeps a long run alive: checksummed atomic checkpoints, signal-driven stops, non-finite guards."""
