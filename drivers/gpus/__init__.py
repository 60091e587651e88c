"""GPU adapters: the GPU capability protocol, its reading type, and the NVML driver."""
