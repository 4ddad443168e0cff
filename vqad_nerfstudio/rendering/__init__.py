"""Rendering of packed samples (ray marching with early termination), for any of the package's fields."""
