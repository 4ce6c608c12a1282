// The GEMM loop compiled for one ISA (flags in CMakeLists.txt); see gemm_loop.h.
#define RK_GEMM_ISA base
#include "gemm_loop_impl.h"
