"""C++/CUDA sources for ProGrad (installed as prograd_fast.csrc; compiled just in time)."""
