"""kinship."""
