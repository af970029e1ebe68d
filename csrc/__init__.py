"""C++/CUDA sources for ProGrad (installed as prograd_fast.csrc; compiled just in time).

``prograd_cpu.cpp``        CPU kernel + binding (vectorised, at::parallel_for): backend "cpp".
``prograd_cuda.cu``        CUDA kernels and host code (single-block, cooperative single-pass
                           and two-pass plans): backend "cuda".
``prograd_cuda_bind.cpp``  the CUDA extension's Python binding.
Built by :mod:`prograd_fast._ext` with ninja through ``torch.utils.cpp_extension.load``.
"""
