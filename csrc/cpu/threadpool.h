// A small persistent thread pool for the CPU kernels. Work is split into
// tasks by the caller; the pool only runs them. Results never depend on the
// thread count because every kernel fixes its own partition of the work.
#pragma once

#include <cstdint>
#include <functional>

namespace fusednn {
namespace cpu {

// The most threads the pool runs; set_num_threads and the environment
// variables are held to [1, kMaxThreads].
constexpr int kMaxThreads = 1024;

// Threads used by kernels: FUSEDNN_NUM_THREADS, else OMP_NUM_THREADS, else
// the number of cores, until set_num_threads changes it.
int num_threads();
void set_num_threads(int n);

// Runs task(i) for i in [0, ntasks) on the pool and the calling thread and
// returns when all are done. The first exception thrown by a task is
// rethrown here. Calls made from inside a task, or while another caller is
// using the pool, run serially on the calling thread.
void parallel_for(int64_t ntasks, const std::function<void(int64_t)>& task);

}  // namespace cpu
}  // namespace fusednn
