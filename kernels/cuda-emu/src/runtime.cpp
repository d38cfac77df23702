// The emulated launch: see include/emu.h for the model.
#include <barrier>
#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <thread>
#include <vector>

#include "emu.h"

thread_local dim3 threadIdx;
thread_local dim3 blockIdx;
dim3 blockDim;
dim3 gridDim;

namespace {
std::mutex launch_lock;
std::barrier<>* block_barrier = nullptr;
float exchange[1024];
}  // namespace

void __syncthreads() { block_barrier->arrive_and_wait(); }

float peft_emu_shfl_xor(float v, int lane_mask) {
  const uint32_t t = threadIdx.x;
  const uint32_t partner = (t & ~31u) | ((t & 31u) ^ (uint32_t)lane_mask);
  if (partner >= blockDim.x) {
    fprintf(stderr, "peft-cuda-emu: shuffle with lane %u outside a block of %u threads\n", partner,
            blockDim.x);
    abort();
  }
  exchange[t] = v;
  __syncthreads();
  const float r = exchange[partner];
  __syncthreads();
  return r;
}

// Runs `body(ctx)` as every thread of every block of a 1-D grid; returns non-zero (and runs
// nothing) for a geometry a GPU would refuse.
extern "C" int peft_emu_launch(uint32_t grid, uint32_t block, void (*body)(void*), void* ctx) {
  if (grid == 0 || block == 0 || block > 1024) return 1;
  std::lock_guard<std::mutex> guard(launch_lock);
  gridDim = {grid, 1, 1};
  blockDim = {block, 1, 1};
  std::barrier<> barrier((std::ptrdiff_t)block);
  block_barrier = &barrier;
  std::vector<std::thread> threads;
  threads.reserve(block);
  for (uint32_t t = 0; t < block; ++t) {
    threads.emplace_back([=, &barrier] {
      threadIdx = {t, 0, 0};
      for (uint32_t b = 0; b < grid; ++b) {
        blockIdx = {b, 0, 0};
        body(ctx);
        barrier.arrive_and_wait();  // the next block starts when this one is done
      }
    });
  }
  for (auto& th : threads) th.join();
  block_barrier = nullptr;
  return 0;
}
