"""A v5p-64 slice (32 chips, 95 GiB each): tokens over the sequence axis (ring attention), rows and
weights over fsdp."""

TOPOLOGY = "v5p:2x4x4"
MESH = "fsdp=2,sequence=16"
