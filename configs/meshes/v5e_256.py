"""A v5e-256 slice (256 chips, 16 GiB each): tokens over the sequence axis (ring attention), rows and
weights over fsdp."""

TOPOLOGY = "v5e:16x16"
MESH = "fsdp=8,sequence=32"
