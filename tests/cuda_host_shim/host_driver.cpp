// ctypes entry points running kernels/local_corr.cu on the host through cuda_host_shim.h (tests only).
// Build: g++ -std=c++20 -O1 -shared -fPIC -pthread -I tests/cuda_host_shim -I kernels
//            tests/cuda_host_shim/host_driver.cpp -o libshim.so
// dtype: 0 = float32, 1 = float16 bits, 2 = bfloat16 bits. One warp (block of 32 threads) per pixel.
#include "cuda_host_shim.h"

#include "local_corr.cu"

extern "C" int host_local_corr_fwd(int dtype, const void* fA, const void* fB, const float* warp, float* out,
                                   int B, int H, int W, int C, int r) {
    const unsigned int blocks = (unsigned int)(B * H * W);
    switch (dtype) {
        case 0:
            rv2_shim_launch(blocks, [&] {
                rv2_local_corr_fwd_f32((const float*)fA, (const float*)fB, warp, out, B, H, W, C, r);
            });
            return 0;
        case 1:
            rv2_shim_launch(blocks, [&] {
                rv2_local_corr_fwd_f16((const rv2_half*)fA, (const rv2_half*)fB, warp, out, B, H, W, C, r);
            });
            return 0;
        case 2:
            rv2_shim_launch(blocks, [&] {
                rv2_local_corr_fwd_bf16((const rv2_bf16*)fA, (const rv2_bf16*)fB, warp, out, B, H, W, C, r);
            });
            return 0;
    }
    return 1;
}

extern "C" int host_local_corr_bwd(int dtype, const float* gout, const void* fA, const void* fB,
                                   const float* warp, float* gA, float* gB, int B, int H, int W, int C, int r) {
    const unsigned int blocks = (unsigned int)(B * H * W);
    switch (dtype) {
        case 0:
            rv2_shim_launch(blocks, [&] {
                rv2_local_corr_bwd_f32(gout, (const float*)fA, (const float*)fB, warp, gA, gB, B, H, W, C, r);
            });
            return 0;
        case 2:
            rv2_shim_launch(blocks, [&] {
                rv2_local_corr_bwd_bf16(gout, (const rv2_bf16*)fA, (const rv2_bf16*)fB, warp, gA, gB, B, H, W, C,
                                        r);
            });
            return 0;
    }
    return 1;
}
