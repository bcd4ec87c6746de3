"""Meshes for the slices users have: the mesh each pipeline stage runs on."""
