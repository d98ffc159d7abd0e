// RoMa v2 refiner local correlation, compiled at run time through NVRTC (see kernels/__init__.py).
//
// No CUDA or torch headers are included: half / bfloat16 values are read through two 16-bit storage
// structs (bit-compatible with __half and __nv_bfloat16) and converted to float in registers, so the
// source compiles with a bare NVRTC and, with RV2_HOST_SHIM defined, with a host C++ compiler
// (tests/cuda_host_shim/) to verify the index arithmetic on the CPU.
//
// Layouts (all contiguous, prepared by romav2_plugin/ops/local_corr.py):
//   fA, fB : (B, H, W, C)  channels-last, element type T in {float, rv2_half, rv2_bf16}
//   warp   : (B, H, W, 2)  float32, normalized [-1, 1], (x, y)
//   out    : (B, K, H, W)  float32, K = (2r+1)^2, k = i*(2r+1) + j
//   gA, gB : (B, H, W, C)  float32 gradients (gB accumulated with atomicAdd, must be zeroed)
//
// out[b,k,y,x] = sum_c fA[b,y,x,c] / sqrt(C) * bilinear(fB[b], warp[b,y,x] + o_k)[c]
//   o_k = ((j - r) * 2 / W, (i - r) * 2 / H), bilinear = F.grid_sample(mode="bilinear",
//   padding_mode="zeros", align_corners=False): pixel = ((x_n + 1) * W - 1) / 2, zero outside.
//
// Work decomposition: one warp (32 lanes) per output pixel. The lanes stride over the channels, so
// every corner read of fB is a coalesced 32-channel row, the pixel's A-vector is read once per
// 256-channel chunk into registers and reused for all K window offsets, and the K dot products are
// finished with a shuffle reduction. The backward recomputes the bilinear taps, accumulates the fA
// gradient in registers and scatters the fB gradient with atomicAdd (coalesced along channels). No
// gradient flows to warp (the official refiner detaches it).

#ifndef RV2_HOST_SHIM
#define RV2_DEV __device__ __forceinline__
#define RV2_KERNEL extern "C" __global__ void __launch_bounds__(256)
#endif

#define RV2_WARP 32
#define RV2_REGS 8  // channels per lane held in registers; one chunk = RV2_WARP * RV2_REGS channels

struct rv2_half {
    unsigned short bits;
};
struct rv2_bf16 {
    unsigned short bits;
};

RV2_DEV float rv2_to_float(float v) { return v; }

RV2_DEV float rv2_to_float(rv2_bf16 v) { return __uint_as_float(((unsigned int)v.bits) << 16); }

RV2_DEV float rv2_to_float(rv2_half v) {
#ifdef RV2_HOST_SHIM
    const unsigned int h = v.bits;
    const unsigned int sign = (h >> 15) & 1u, expo = (h >> 10) & 0x1fu, mant = h & 0x3ffu;
    float f;
    if (expo == 0u) {
        f = (float)mant * 5.9604644775390625e-08f;  // subnormal: mant * 2^-24
    } else if (expo == 31u) {
        f = __uint_as_float(0x7f800000u | (mant << 13));
    } else {
        f = __uint_as_float(((expo + 112u) << 23) | (mant << 13));
    }
    return sign ? -f : f;
#else
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v.bits));
    return f;
#endif
}

RV2_DEV float rv2_warp_sum(float v) {
    for (int o = RV2_WARP / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// Bilinear taps of one normalized sample point, grid_sample(align_corners=False, zeros) semantics.
// Invalid corners get offset -1 and weight 0.
struct rv2_taps {
    long long off[4];  // pixel offsets (y * W + x) of nw, ne, sw, se
    float w[4];
};

RV2_DEV void rv2_bilinear_taps(float xn, float yn, int H, int W, rv2_taps& t) {
    // ((x_n + 1) * W - 1) / 2, written as torch's CPU kernel does: (x_n + 1) * (W / 2) - 0.5
    const float ix = (xn + 1.f) * (0.5f * (float)W) - 0.5f;
    const float iy = (yn + 1.f) * (0.5f * (float)H) - 0.5f;
    const float fx = floorf(ix), fy = floorf(iy);
    const float dx = ix - fx, dy = iy - fy;  // distance to west / north corner
    const float ex = 1.f - dx, sy = 1.f - dy;
    // clamp before the integer conversion so huge / NaN coordinates stay well defined (-> invalid)
    const int x0 = (int)fminf(fmaxf(fx, -2.f), (float)W + 1.f);
    const int y0 = (int)fminf(fmaxf(fy, -2.f), (float)H + 1.f);
    const bool vx0 = x0 >= 0 && x0 < W, vx1 = x0 + 1 >= 0 && x0 + 1 < W;
    const bool vy0 = y0 >= 0 && y0 < H, vy1 = y0 + 1 >= 0 && y0 + 1 < H;
    const bool ok = (ix == ix) && (iy == iy);  // NaN -> all taps invalid
    const long long r0 = (long long)y0 * W, r1 = (long long)(y0 + 1) * W;
    t.off[0] = (ok && vy0 && vx0) ? r0 + x0 : -1;
    t.off[1] = (ok && vy0 && vx1) ? r0 + x0 + 1 : -1;
    t.off[2] = (ok && vy1 && vx0) ? r1 + x0 : -1;
    t.off[3] = (ok && vy1 && vx1) ? r1 + x0 + 1 : -1;
    t.w[0] = t.off[0] >= 0 ? sy * ex : 0.f;
    t.w[1] = t.off[1] >= 0 ? sy * dx : 0.f;
    t.w[2] = t.off[2] >= 0 ? dy * ex : 0.f;
    t.w[3] = t.off[3] >= 0 ? dy * dx : 0.f;
}

// Sample channel c of the channels-last image base (H*W pixels x C channels) at the taps.
template <typename T>
RV2_DEV float rv2_sample(const T* __restrict__ base, const rv2_taps& t, long long C, int c) {
    float v = 0.f;
#pragma unroll
    for (int q = 0; q < 4; ++q) {
        if (t.off[q] >= 0) v += t.w[q] * rv2_to_float(base[t.off[q] * C + c]);
    }
    return v;
}

// ---------------------------------------------------------------------------------------------------
// forward
template <typename T>
RV2_DEV void rv2_local_corr_fwd(const T* __restrict__ fA, const T* __restrict__ fB,
                                const float* __restrict__ warp, float* __restrict__ out, int B, int H,
                                int W, int C, int r) {
    const int lane = (int)(threadIdx.x % RV2_WARP);
    const long long pix = (long long)blockIdx.x * (blockDim.x / RV2_WARP) + threadIdx.x / RV2_WARP;
    const long long HW = (long long)H * W;
    if (pix >= (long long)B * HW) return;  // uniform over the warp
    const long long b = pix / HW, rem = pix - b * HW;
    const int D = 2 * r + 1, K = D * D;
    const float scale = 1.f / sqrtf((float)C);
    const float wx = warp[2 * pix], wy = warp[2 * pix + 1];
    const T* a_ptr = fA + pix * C;
    const T* b_base = fB + b * HW * C;
    float* o_ptr = out + b * K * HW + rem;
    for (int c0 = 0; c0 < C; c0 += RV2_WARP * RV2_REGS) {
        float a[RV2_REGS];
#pragma unroll
        for (int s = 0; s < RV2_REGS; ++s) {
            const int c = c0 + s * RV2_WARP + lane;
            a[s] = c < C ? rv2_to_float(a_ptr[c]) * scale : 0.f;
        }
        for (int k = 0; k < K; ++k) {
            const int i = k / D, j = k - (k / D) * D;
            rv2_taps t;
            rv2_bilinear_taps(wx + (float)(j - r) * 2.f / (float)W, wy + (float)(i - r) * 2.f / (float)H,
                              H, W, t);
            float acc = 0.f;
#pragma unroll
            for (int s = 0; s < RV2_REGS; ++s) {
                const int c = c0 + s * RV2_WARP + lane;
                if (c < C) acc += a[s] * rv2_sample(b_base, t, C, c);
            }
            acc = rv2_warp_sum(acc);
            if (lane == 0) {
                if (c0 == 0) o_ptr[k * HW] = acc;
                else o_ptr[k * HW] += acc;
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------------
// backward: gA (optional, may be null) = sum_k g_k * bilinear_k(fB) / sqrt(C), written (B,H,W,C);
//           gB (optional, may be null, zero-initialised) += g_k * w_q * fA / sqrt(C), scattered.
template <typename T>
RV2_DEV void rv2_local_corr_bwd(const float* __restrict__ gout, const T* __restrict__ fA,
                                const T* __restrict__ fB, const float* __restrict__ warp,
                                float* __restrict__ gA, float* __restrict__ gB, int B, int H, int W, int C,
                                int r) {
    const int lane = (int)(threadIdx.x % RV2_WARP);
    const long long pix = (long long)blockIdx.x * (blockDim.x / RV2_WARP) + threadIdx.x / RV2_WARP;
    const long long HW = (long long)H * W;
    if (pix >= (long long)B * HW) return;
    const long long b = pix / HW, rem = pix - b * HW;
    const int D = 2 * r + 1, K = D * D;
    const float scale = 1.f / sqrtf((float)C);
    const float wx = warp[2 * pix], wy = warp[2 * pix + 1];
    const T* a_ptr = fA + pix * C;
    const T* b_base = fB + b * HW * C;
    float* gb_base = gB ? gB + b * HW * C : gB;
    const float* g_ptr = gout + b * K * HW + rem;
    for (int c0 = 0; c0 < C; c0 += RV2_WARP * RV2_REGS) {
        float a[RV2_REGS], ga[RV2_REGS];
#pragma unroll
        for (int s = 0; s < RV2_REGS; ++s) {
            const int c = c0 + s * RV2_WARP + lane;
            a[s] = (gB && c < C) ? rv2_to_float(a_ptr[c]) * scale : 0.f;
            ga[s] = 0.f;
        }
        for (int k = 0; k < K; ++k) {
            const float g = g_ptr[k * HW];
            const int i = k / D, j = k - (k / D) * D;
            rv2_taps t;
            rv2_bilinear_taps(wx + (float)(j - r) * 2.f / (float)W, wy + (float)(i - r) * 2.f / (float)H,
                              H, W, t);
            if (gA) {
#pragma unroll
                for (int s = 0; s < RV2_REGS; ++s) {
                    const int c = c0 + s * RV2_WARP + lane;
                    if (c < C) ga[s] += g * rv2_sample(b_base, t, C, c);
                }
            }
            if (gB) {
#pragma unroll
                for (int q = 0; q < 4; ++q) {
                    if (t.off[q] < 0) continue;
                    const float gw = g * t.w[q];
                    float* dst = gb_base + t.off[q] * C;
#pragma unroll
                    for (int s = 0; s < RV2_REGS; ++s) {
                        const int c = c0 + s * RV2_WARP + lane;
                        if (c < C) atomicAdd(dst + c, gw * a[s]);
                    }
                }
            }
        }
        if (gA) {
#pragma unroll
            for (int s = 0; s < RV2_REGS; ++s) {
                const int c = c0 + s * RV2_WARP + lane;
                if (c < C) gA[pix * C + c] = ga[s] * scale;
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------------
// entry points (one per element type; launch with blockDim.x a multiple of 32, one warp per pixel)
#define RV2_ENTRY_POINTS(SUFFIX, T)                                                                      \
    RV2_KERNEL rv2_local_corr_fwd_##SUFFIX(const T* fA, const T* fB, const float* warp, float* out,     \
                                           int B, int H, int W, int C, int r) {                         \
        rv2_local_corr_fwd<T>(fA, fB, warp, out, B, H, W, C, r);                                        \
    }                                                                                                   \
    RV2_KERNEL rv2_local_corr_bwd_##SUFFIX(const float* gout, const T* fA, const T* fB,                 \
                                           const float* warp, float* gA, float* gB, int B, int H,       \
                                           int W, int C, int r) {                                       \
        rv2_local_corr_bwd<T>(gout, fA, fB, warp, gA, gB, B, H, W, C, r);                               \
    }

#ifndef RV2_SPEC_C
RV2_ENTRY_POINTS(f32, float)
#ifndef RV2_NO_HALF
RV2_ENTRY_POINTS(f16, rv2_half)
RV2_ENTRY_POINTS(bf16, rv2_bf16)
#endif
#endif  // RV2_SPEC_C

// ---------------------------------------------------------------------------------------------------
// Specialised forward, compiled per (channels, radius) at run time: -DRV2_SPEC_C=<C> -DRV2_SPEC_R=<r>.
// Channels, radius and element type are compile-time constants (the window loop has a fixed trip count,
// the per-lane register vector a fixed size, the channel guard disappears when it is not needed); the tile
// is a template parameter, one entry point per candidate, chosen by the autotuner (ops/local_corr_tune.py):
//   LANES  threads per output pixel (4, 8, 16, 32: 32 / LANES pixels per warp, neighbours in a row),
//   VEC    channels per vector load (4, 8 or 16 bytes: VEC = bytes / sizeof(T)).
// Lane l holds the channels c = s * LANES * VEC + l * VEC + v (s < S, v < VEC) of its pixel's A-vector;
// the K dot products are finished with a shuffle reduction inside the LANES-wide group. Any blockDim.x
// that is a multiple of 32 (and at most 256) works: the launch's block size is the third tile parameter.
// Entry points: rv2_lc_fwd_<sfx>_l<LANES>_v<VEC>, same arguments as rv2_local_corr_fwd_<sfx> minus C, r.
template <typename T, int V>
struct alignas(sizeof(T) * V) rv2_vec {
    T v[V];
};

template <typename T, int C, int R, int LANES, int VEC>
RV2_DEV void rv2_lc_fwd_spec(const T* __restrict__ fA, const T* __restrict__ fB, const float* __restrict__ warp,
                             float* __restrict__ out, int B, int H, int W) {
    constexpr int D = 2 * R + 1, K = D * D;
    constexpr int STEP = LANES * VEC, S = (C + STEP - 1) / STEP;
    constexpr bool GUARD = (C % STEP) != 0;
    static_assert(C % VEC == 0, "VEC must divide C");
    const int lane = (int)(threadIdx.x % LANES);
    const long long pix = (long long)blockIdx.x * (blockDim.x / LANES) + threadIdx.x / LANES;
    const long long HW = (long long)H * W;
    // sub-warp groups: a group past the end still joins the shuffles (reads pixel 0, writes nothing)
    const bool valid = pix < (long long)B * HW;
    const long long p = valid ? pix : 0;
    const long long b = p / HW, rem = p - b * HW;
    const float scale = 1.f / sqrtf((float)C);
    const float wx = warp[2 * p], wy = warp[2 * p + 1];
    const T* a_ptr = fA + p * C;
    const T* b_base = fB + b * HW * C;
    float a[S][VEC];
#pragma unroll
    for (int s = 0; s < S; ++s) {
        const int c = s * STEP + lane * VEC;
        if (!GUARD || c < C) {
            const rv2_vec<T, VEC> x = *reinterpret_cast<const rv2_vec<T, VEC>*>(a_ptr + c);
#pragma unroll
            for (int v = 0; v < VEC; ++v) a[s][v] = rv2_to_float(x.v[v]) * scale;
        } else {
#pragma unroll
            for (int v = 0; v < VEC; ++v) a[s][v] = 0.f;
        }
    }
    float* o_ptr = out + b * (long long)K * HW + rem;
    for (int k = 0; k < K; ++k) {
        const int i = k / D, j = k - (k / D) * D;
        rv2_taps t;
        rv2_bilinear_taps(wx + (float)(j - R) * 2.f / (float)W, wy + (float)(i - R) * 2.f / (float)H, H, W, t);
        float acc = 0.f;
#pragma unroll
        for (int q = 0; q < 4; ++q) {
            if (t.off[q] < 0) continue;
            const T* row = b_base + t.off[q] * C;
            float part = 0.f;
#pragma unroll
            for (int s = 0; s < S; ++s) {
                const int c = s * STEP + lane * VEC;
                if (!GUARD || c < C) {
                    const rv2_vec<T, VEC> x = *reinterpret_cast<const rv2_vec<T, VEC>*>(row + c);
#pragma unroll
                    for (int v = 0; v < VEC; ++v) part += a[s][v] * rv2_to_float(x.v[v]);
                }
            }
            acc += t.w[q] * part;
        }
#pragma unroll
        for (int o = LANES / 2; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
        if (valid && lane == 0) o_ptr[k * HW] = acc;
    }
}

#ifdef RV2_SPEC_C
#ifndef RV2_SPEC_R
#error "RV2_SPEC_R (the radius) must be defined with RV2_SPEC_C"
#endif
#define RV2_SPEC_ENTRY(SUFFIX, T, LANES, VEC)                                                            \
    RV2_KERNEL rv2_lc_fwd_##SUFFIX##_l##LANES##_v##VEC(const T* fA, const T* fB, const float* warp,     \
                                                       float* out, int B, int H, int W) {               \
        rv2_lc_fwd_spec<T, RV2_SPEC_C, RV2_SPEC_R, LANES, VEC>(fA, fB, warp, out, B, H, W);             \
    }
// the vector widths valid for C: 4, 8 and 16 bytes; VEC must divide C (RV2_DIV(n) is 1 when n | C)
#define RV2_DIV(n) ((RV2_SPEC_C % (n)) == 0)
#define RV2_SPEC_LANES(SUFFIX, T, VEC) \
    RV2_SPEC_ENTRY(SUFFIX, T, 4, VEC)  \
    RV2_SPEC_ENTRY(SUFFIX, T, 8, VEC)  \
    RV2_SPEC_ENTRY(SUFFIX, T, 16, VEC) \
    RV2_SPEC_ENTRY(SUFFIX, T, 32, VEC)
RV2_SPEC_LANES(f32, float, 1)
#if RV2_DIV(2)
RV2_SPEC_LANES(f32, float, 2)
RV2_SPEC_LANES(f16, rv2_half, 2)
RV2_SPEC_LANES(bf16, rv2_bf16, 2)
#endif
#if RV2_DIV(4)
RV2_SPEC_LANES(f32, float, 4)
RV2_SPEC_LANES(f16, rv2_half, 4)
RV2_SPEC_LANES(bf16, rv2_bf16, 4)
#endif
#if RV2_DIV(8)
RV2_SPEC_LANES(f16, rv2_half, 8)
RV2_SPEC_LANES(bf16, rv2_bf16, 8)
#endif
#endif  // RV2_SPEC_C
