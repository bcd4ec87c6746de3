"""A v5p-128 slice (64 chips): tokens over 16 devices, rows over 4 (a 128k-256k stage of a 7B model
with ring attention)."""

TOPOLOGY = "v5p:4x4x4"
MESH = "fsdp=4,sequence=16"
