"""A v6e-256 slice (256 chips, 32 GiB each): tokens over the sequence axis (ring attention), rows and
weights over fsdp."""

TOPOLOGY = "v6e:16x16"
MESH = "fsdp=8,sequence=32"
