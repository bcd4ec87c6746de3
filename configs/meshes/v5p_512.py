"""A v5p-512 slice (256 chips): tokens over the sequence axis (ring attention), rows and
weights over fsdp."""

TOPOLOGY = "v5p:8x8x4"
MESH = "fsdp=8,sequence=32"
