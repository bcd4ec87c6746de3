"""A v4-32 slice: 16 chips, which the compiler sees as 32 devices (a v4 chip's two TensorCores, 16
GiB each); tokens over the sequence axis (ring attention), rows and weights over fsdp."""

TOPOLOGY = "v4:2x2x4"
MESH = "fsdp=4,sequence=8"
