// The GEMM loop compiled for one ISA (flags in CMakeLists.txt); see gemm_loop.h.
#define RK_GEMM_ISA avx2
#include "gemm_loop_impl.h"
