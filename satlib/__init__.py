"""satlib."""
