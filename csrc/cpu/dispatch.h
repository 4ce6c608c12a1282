// Runtime ISA dispatch for the kernels without -march=native: GCC compiles a function marked
// RK_CLONES once per listed target and picks one at load time (ifunc). Templates cannot carry the
// attribute, so each kernel is an always-inline template wrapped by one cloned function per dtype.
#pragma once

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && !defined(RK_NO_CLONES)
#define RK_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define RK_CLONES
#endif
#define RK_ALWAYS_INLINE inline __attribute__((always_inline))
