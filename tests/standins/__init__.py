"""Stand-ins for hardware and libraries CI cannot have (each says so in its name); tests only."""
