// A minimal SIMT emulator: runs CUDA kernels (as plain C++ functions) on the CPU with one
// std::thread per CUDA thread of a block, blocks one after another. __syncthreads is a
// block barrier, __shfl_xor_sync a warp exchange through two warp barriers, __shared__
// variables are function statics (one block runs at a time). For checking index
// arithmetic of csrc/*.cu without a GPU; nothing about speed or memory ordering.
#pragma once
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <thread>
#include <vector>
#include <cmath>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__  // (glibc's __attribute__((__noinline__)) then reads __attribute__(()): still valid)
#define __launch_bounds__(...)
#define __restrict__ __restrict
#define __shared__ static
#define C10_CUDA_KERNEL_LAUNCH_CHECK() do { } while (0)
#define C10_CUDA_CHECK(e) (void)(e)
// A vector access (csrc/*.cu: load_pack/store_pack) must be aligned to its size on a GPU;
// x86 would not fault, so the emulator checks it.
#define DISSEG_CHECK_ALIGNED(p, bytes)                                                     \
  do {                                                                                     \
    if (reinterpret_cast<uintptr_t>(p) % (bytes) != 0) {                                   \
      std::fprintf(stderr, "misaligned %zu-byte access at %p\n", size_t(bytes), (const void*)(p)); \
      std::abort();                                                                        \
    }                                                                                      \
  } while (0)
using cudaStream_t = int;

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {}
};
struct emu_uint3 { unsigned x, y, z; };

enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount = 16 };
inline int cudaDeviceGetAttribute(int* v, cudaDeviceAttr, int) {
  const char* e = std::getenv("DISSEG_EMU_SMS");
  *v = e ? std::atoi(e) : 4;
  return 0;
}

namespace c10 { namespace cuda {
struct CUDAGuard { template <class D> explicit CUDAGuard(const D&) {} };
inline int getCurrentCUDAStream() { return 0; }
} }

namespace emu {
class Barrier {
 public:
  explicit Barrier(int n) : n_(n) {}
  void wait() {
    std::unique_lock<std::mutex> l(m_);
    const unsigned g = gen_;
    if (++count_ == n_) { count_ = 0; ++gen_; cv_.notify_all(); }
    else cv_.wait(l, [&] { return gen_ != g; });
  }
 private:
  std::mutex m_; std::condition_variable cv_; int n_, count_ = 0; unsigned gen_ = 0;
};
struct Warp {
  explicit Warp(int n) : bar(n) {}
  Barrier bar; uint64_t slot[32];
};
struct Block {
  Block(int n, size_t smem_bytes) : bar(n), smem(smem_bytes + 16, 0xFF) {
    for (int w = 0; w * 32 < n; ++w) warps.emplace_back(new Warp(std::min(32, n - 32 * w)));
  }
  ~Block() { for (auto* w : warps) delete w; }
  Barrier bar; std::vector<Warp*> warps;
  std::vector<unsigned char> smem;  // extern __shared__ (0xFF bytes: an unwritten float reads NaN)
};
inline thread_local emu_uint3 t_thread, t_block;
inline thread_local dim3 t_bdim, t_gdim;
inline thread_local Block* t_ctx = nullptr;
inline thread_local int t_lane = 0, t_warp = 0;

template <class F>
void launch(dim3 grid, dim3 block, size_t smem_bytes, F&& body) {
  const int nt = block.x * block.y * block.z;
  Block ctx(nt, smem_bytes);
  std::vector<std::thread> ts;
  for (int t = 0; t < nt; ++t) {
    ts.emplace_back([&, t] {
      t_ctx = &ctx; t_bdim = block; t_gdim = grid;
      t_thread = {unsigned(t % block.x), unsigned((t / block.x) % block.y), unsigned(t / (block.x * block.y))};
      t_lane = t % 32; t_warp = t / 32;
      for (unsigned bz = 0; bz < grid.z; ++bz)
        for (unsigned by = 0; by < grid.y; ++by)
          for (unsigned bx = 0; bx < grid.x; ++bx) {
            t_block = {bx, by, bz};
            body();
            ctx.bar.wait();
          }
    });
  }
  for (auto& th : ts) th.join();
}
}  // namespace emu

#define threadIdx emu::t_thread
#define blockIdx emu::t_block
#define blockDim emu::t_bdim
#define gridDim emu::t_gdim

inline void __syncthreads() { emu::t_ctx->bar.wait(); }

template <class T>
T __shfl_xor_sync(unsigned, T v, int o) {
  static_assert(sizeof(T) <= 8, "shuffle of at most 8 bytes");
  emu::Warp* w = emu::t_ctx->warps[emu::t_warp];
  std::memcpy(&w->slot[emu::t_lane], &v, sizeof(T));
  w->bar.wait();
  T r;
  std::memcpy(&r, &w->slot[emu::t_lane ^ o], sizeof(T));
  w->bar.wait();
  return r;
}

inline void __syncwarp(unsigned = 0xffffffffu) { emu::t_ctx->warps[emu::t_warp]->bar.wait(); }

// Device math that the CUDA headers provide and host C++ does not.
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
template <class T> inline T max(T a, T b) { return a < b ? b : a; }
template <class T> inline T min(T a, T b) { return b < a ? b : a; }
