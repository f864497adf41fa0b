"""The base layer: small pieces that import nothing else of the project."""
