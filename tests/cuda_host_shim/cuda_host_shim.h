// Host (CPU) emulation of the small CUDA subset used by kernels/*.cu, for tests only.
//
// Each block is run with one std::thread per CUDA thread, so warp shuffles and atomics behave like on a
// GPU (lanes really exchange values through a barrier). Launch with blockDim.x == 32 (one warp per block):
// the shuffle emulation synchronises the whole block.
#pragma once

#include <barrier>
#include <cmath>
#include <cstring>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

#define RV2_HOST_SHIM 1
#define RV2_DEV static inline
#define RV2_KERNEL extern "C" void
#define __restrict__ __restrict

struct dim3 {
    unsigned int x = 1, y = 1, z = 1;
};

inline thread_local dim3 threadIdx;
inline thread_local dim3 blockIdx;
inline dim3 blockDim;
inline dim3 gridDim;

inline float __uint_as_float(unsigned int u) {
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
}

namespace rv2_shim {
inline std::barrier<>* bar = nullptr;
inline float xchg[32];
inline std::mutex atomic_mutex;
}  // namespace rv2_shim

inline float __shfl_xor_sync(unsigned int /*mask*/, float v, int lane_mask) {
    const unsigned int lane = threadIdx.x % 32u;
    rv2_shim::bar->arrive_and_wait();  // everybody has read the previous exchange
    rv2_shim::xchg[lane] = v;
    rv2_shim::bar->arrive_and_wait();  // everybody has written
    return rv2_shim::xchg[lane ^ (unsigned int)lane_mask];
}

inline float atomicAdd(float* address, float v) {
    std::lock_guard<std::mutex> lock(rv2_shim::atomic_mutex);
    const float old = *address;
    *address = old + v;
    return old;
}

// Run kernel() over a 1-D grid of `blocks` blocks of 32 threads.
inline void rv2_shim_launch(unsigned int blocks, const std::function<void()>& kernel) {
    const unsigned int threads = 32;
    gridDim = dim3{blocks, 1, 1};
    blockDim = dim3{threads, 1, 1};
    std::barrier<> bar(threads);
    rv2_shim::bar = &bar;
    for (unsigned int bx = 0; bx < blocks; ++bx) {
        std::vector<std::thread> pool;
        pool.reserve(threads);
        for (unsigned int tx = 0; tx < threads; ++tx) {
            pool.emplace_back([bx, tx, &kernel] {
                blockIdx = dim3{bx, 0, 0};
                threadIdx = dim3{tx, 0, 0};
                kernel();
            });
        }
        for (auto& t : pool) t.join();
    }
    rv2_shim::bar = nullptr;
}
