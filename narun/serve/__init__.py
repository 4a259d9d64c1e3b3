"""Streaming inference server; built in the serving issue."""
