"""FFCV data: ImageFolder -> .beton writer, loaders and traversal orders."""
