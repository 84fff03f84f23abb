"""Population search strategies over weight space (Evolver first)."""
