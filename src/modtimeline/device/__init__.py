"""Device: GPU time on the host clock (``clock``: CUDA events, no synchronisation inside
a step; ``fake``: a CPU stand-in that keeps CUDA's rules) and NVTX ranges (``nvtx``)."""
