// ctypes entry point running the specialised local-correlation forward of kernels/local_corr.cu on the host
// through cuda_host_shim.h (tests only). Build with -DRV2_SPEC_C=<C> -DRV2_SPEC_R=<r> (as NVRTC does):
//   g++ -std=c++20 -O1 -shared -fPIC -pthread -DRV2_SPEC_C=48 -DRV2_SPEC_R=1 -I tests/cuda_host_shim -I kernels
//       tests/cuda_host_shim/host_spec_driver.cpp -o libspec.so
// The entry points rv2_lc_fwd_<sfx>_l<LANES>_v<VEC> are exported as they are; host_lc_fwd_spec launches one
// of them (looked up by the caller, passed as a pointer) over blocks of 32 threads, 32 / lanes pixels each.
#include "cuda_host_shim.h"

#include "local_corr.cu"

typedef void (*rv2_spec_fn)(const void*, const void*, const float*, float*, int, int, int);

extern "C" int host_lc_fwd_spec(void* entry, int lanes, const void* fA, const void* fB, const float* warp,
                                float* out, int B, int H, int W) {
    if (lanes <= 0 || 32 % lanes != 0) return 1;
    const long long pixels = (long long)B * H * W;
    const long long per_block = 32 / lanes;
    const unsigned int blocks = (unsigned int)((pixels + per_block - 1) / per_block);
    const rv2_spec_fn fn = (rv2_spec_fn)entry;
    rv2_shim_launch(blocks, [&] { fn(fA, fB, warp, out, B, H, W); });
    return 0;
}
