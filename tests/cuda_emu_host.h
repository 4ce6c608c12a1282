// cuda_emu_host.h -- just enough of the CUDA execution model, on host threads, to run the
// kernels of csrc/cuda/*.cu under g++ in the CPU test suite (tests/cuda_emu.py builds them).
//
// Every CUDA thread of a launch is one std::thread, all running at once, so __syncthreads is a
// real barrier per block and the persistent kernels' grid barrier really synchronises blocks.
// Only what the kernels use is here: 1-D launches, dynamic shared memory, __syncthreads,
// __threadfence, atomicAdd/atomicExch on unsigned int, __ldcg, __nanosleep, __shfl_xor_sync
// (full warps of 32 consecutive threads), and thread-block
// clusters of consecutive blocks (rank, cluster index, cluster barrier; common.cuh's
// rk_cluster_*), with __cluster_dims__ read by the launcher instead of the compiler.
// Warps exist only for the shuffles (lockstep execution is not emulated). Not emulated either:
// memory-model subtleties of the GPU (L1 incoherence), performance.
#pragma once

#include <algorithm>
#include <atomic>
#include <barrier>
#include <cstddef>
#include <memory>
#include <stdexcept>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __align__(n) alignas(n)
#define __cluster_dims__(...)
#define RK_HOST_EMULATION 1

struct dim3 {
    unsigned int x = 1, y = 1, z = 1;
};

namespace rk_emu {
struct BlockState {
    std::barrier<>* sync;
    std::barrier<>* cluster_sync;
    unsigned char* smem;
    unsigned int cluster_size;
    std::vector<std::unique_ptr<std::barrier<>>> warp_syncs;  // one per warp of the block
    std::vector<double> lanes;                                 // a shuffle's values, per thread
};
inline thread_local dim3 t_thread, t_block, t_blockdim, t_griddim;
inline thread_local BlockState* t_state = nullptr;

// Every block's shared memory has 16 guard bytes after it; a launch that wrote into them (a
// kernel/host layout mismatch) sets this flag, which the Python side reads after each launch.
constexpr unsigned char kGuard = 0xCD;
inline std::atomic<int> g_smem_overrun{0};
inline int take_smem_overrun() { return g_smem_overrun.exchange(0); }

// cluster: blocks per cluster (1: a plain launch); the grid must be a multiple of it
template <class F>
void launch(unsigned int grid, unsigned int block, std::size_t smem, unsigned int cluster,
            F body) {
    if (cluster == 0 || grid % cluster != 0) throw std::invalid_argument("grid % cluster != 0");
    std::vector<std::unique_ptr<std::barrier<>>> syncs, cluster_syncs;
    std::vector<std::vector<unsigned char>> memory(grid);
    std::vector<BlockState> states(grid);
    for (unsigned int c = 0; c < grid / cluster; ++c)
        cluster_syncs.emplace_back(new std::barrier<>((std::ptrdiff_t)cluster * block));
    for (unsigned int b = 0; b < grid; ++b) {
        syncs.emplace_back(new std::barrier<>(block));
        memory[b].assign(smem + 16, kGuard);  // garbage-ish, as fresh shared memory is
        BlockState& st = states[b];
        st.sync = syncs.back().get();
        st.cluster_sync = cluster_syncs[b / cluster].get();
        st.smem = memory[b].data();
        st.cluster_size = cluster;
        for (unsigned int w = 0; w * 32 < block; ++w)
            st.warp_syncs.emplace_back(new std::barrier<>(std::min(32u, block - w * 32)));
        st.lanes.assign(block, 0.0);
    }
    std::vector<std::thread> threads;
    threads.reserve((std::size_t)grid * block);
    for (unsigned int b = 0; b < grid; ++b)
        for (unsigned int t = 0; t < block; ++t)
            threads.emplace_back([&, b, t] {
                t_thread.x = t;
                t_block.x = b;
                t_blockdim.x = block;
                t_griddim.x = grid;
                t_state = &states[b];
                body();
            });
    for (auto& th : threads) th.join();
    for (const auto& m : memory)
        if (std::any_of(m.end() - 16, m.end(), [](unsigned char c) { return c != kGuard; }))
            g_smem_overrun = 1;
}
}  // namespace rk_emu

#define threadIdx (rk_emu::t_thread)
#define blockIdx (rk_emu::t_block)
#define blockDim (rk_emu::t_blockdim)
#define gridDim (rk_emu::t_griddim)
#define RK_DYNAMIC_SMEM(name) unsigned char* name = rk_emu::t_state->smem

inline void __syncthreads() { rk_emu::t_state->sync->arrive_and_wait(); }

// every lane of the warp must call it (as the kernels do: full warps, uniform control flow)
template <class T>
inline T __shfl_xor_sync(unsigned int, T v, int lane_mask) {
    rk_emu::BlockState& st = *rk_emu::t_state;
    const unsigned int t = threadIdx.x, partner = (t & ~31u) | ((t & 31u) ^ (unsigned)lane_mask);
    std::barrier<>& warp = *st.warp_syncs[t / 32];
    st.lanes[t] = (double)v;  // exact for float and double
    warp.arrive_and_wait();
    const T got = (T)st.lanes[partner];
    warp.arrive_and_wait();  // nobody overwrites a value before its partner has read it
    return got;
}

template <int TAG>
inline unsigned int rk_cluster_rank() { return blockIdx.x % rk_emu::t_state->cluster_size; }
template <int TAG>
inline unsigned int rk_cluster_id() { return blockIdx.x / rk_emu::t_state->cluster_size; }
template <int TAG>
inline void rk_cluster_sync() { rk_emu::t_state->cluster_sync->arrive_and_wait(); }
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __nanosleep(unsigned int) { std::this_thread::yield(); }
inline unsigned int atomicAdd(unsigned int* p, unsigned int v) {
    return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST);
}
inline unsigned int atomicExch(unsigned int* p, unsigned int v) {
    return __atomic_exchange_n(p, v, __ATOMIC_SEQ_CST);
}
template <class T>
inline T __ldcg(const T* p) {
    T v;
    __atomic_load(p, &v, __ATOMIC_RELAXED);
    return v;
}
using std::max;
using std::min;
