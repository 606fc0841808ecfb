"""Deployment: the packed 1-bit format, packing, and the packed forward."""
