"""Data handling on top of nerfstudio's data managers."""
