// The thread pool behind parallel_for: workers take task indices from an
// atomic counter. Between regions a worker first spins for a bounded time
// (kSpinTime, like an OpenMP runtime's block time), then sleeps on a
// condition variable: waking a sleeping thread costs this machine about
// 9 us, more than a layer-sized kernel's whole share of work, while a
// spinning one joins in well under a microsecond; and after the spin no
// CPU is burnt while the process is idle. The caller waits for its workers
// the same way.
//
// Workers spin between regions only while regions come within the spin
// time of each other (the gap before the latest region decides). Between
// PyTorch operators, whose OpenMP threads spin on the same cores, a
// spinning worker only took a core from them: a patched training step on
// two cores was 5-25% slower with two threads than with one, and as fast
// once the workers slept at once there.
#include "cpu/threadpool.h"

#include <pthread.h>
#if defined(__linux__)
#include <sched.h>
#endif

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <exception>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace fusednn {
namespace cpu {
namespace {

// The cores this process may run on (taskset, container CPU sets), not
// every core of the machine.
int usable_cores() {
#if defined(__linux__)
  cpu_set_t allowed;
  if (sched_getaffinity(0, sizeof allowed, &allowed) == 0 && CPU_COUNT(&allowed) > 0)
    return CPU_COUNT(&allowed);
#endif
  const unsigned cores = std::thread::hardware_concurrency();
  return cores == 0 ? 1 : static_cast<int>(cores);
}

int threads_from_environment() {
  for (const char* name : {"FUSEDNN_NUM_THREADS", "OMP_NUM_THREADS"}) {
    const char* value = std::getenv(name);
    if (value != nullptr && *value != '\0') {
      char* end = nullptr;
      const long n = std::strtol(value, &end, 10);
      if (end != value && n > 0) return static_cast<int>(std::min<long>(n, kMaxThreads));
    }
  }
  return usable_cores();
}

thread_local bool t_inside_task = false;

// Long enough to bridge the gap between back-to-back kernel calls from
// Python (a few microseconds) or with some numpy work between them; short
// enough that an idle process stops using CPU within a millisecond.
constexpr std::chrono::microseconds kSpinTime{200};

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

// Spins until ready() or `limit` has passed; returns ready().
template <class Ready> bool spin_until(std::chrono::microseconds limit, Ready ready) {
  if (limit.count() == 0) return ready();
  const auto deadline = std::chrono::steady_clock::now() + limit;
  for (unsigned i = 1;; ++i) {
    if (ready()) return true;
    cpu_relax();
    // The clock costs tens of nanoseconds: read it every 64 pauses.
    if (i % 64 == 0) {
      if (std::chrono::steady_clock::now() >= deadline) return ready();
      // The thread waited for may be queued on this very core: a worker
      // woken after a few milliseconds asleep was placed on the caller's
      // core here, behind the caller's spin, until that core's next tick.
      std::this_thread::yield();
    }
  }
}

class Pool {
 public:
  explicit Pool(int threads) : threads_(threads), spin_(spin_time(threads)) {}

  // Worker threads are detached and live for the process: joining them at
  // interpreter exit could deadlock with a thread still blocked in Python.
  int threads() const { return threads_; }

  void resize(int threads) {
    std::lock_guard<std::mutex> run_lock(run_mutex_);
    threads_ = threads;
    spin_.store(spin_time(threads));
  }

  void run(int64_t ntasks, const TaskRef& task, int max_threads) {
    if (ntasks <= 0) return;
    if (ntasks == 1 || max_threads <= 1 || t_inside_task) {
      run_serially(ntasks, task);
      return;
    }
    std::unique_lock<std::mutex> run_lock(run_mutex_, std::try_to_lock);
    if (threads_ <= 1 || !run_lock.owns_lock()) {
      run_serially(ntasks, task);
      return;
    }
    ensure_workers(threads_ - 1);
    const auto start = std::chrono::steady_clock::now();
    idle_spin_.store(start - last_end_ < kSpinTime);
    {
      std::lock_guard<std::mutex> lock(mutex_);
      task_ = &task;
      ntasks_ = ntasks;
      next_.store(0);
      remaining_.store(ntasks);
      error_ = nullptr;
      active_workers_ = std::min<int64_t>(std::min(threads_, max_threads) - 1, ntasks - 1);
      generation_.fetch_add(1);
    }
    // Cheap when no worker sleeps: spinning ones see the new generation.
    wake_.notify_all();
    work();
    spin_until(spin_.load(), [this] { return finished(); });
    std::unique_lock<std::mutex> lock(mutex_);
    done_.wait(lock, [this] { return finished(); });
    // Workers that have not woken yet must not join a finished region.
    active_workers_ = 0;
    task_ = nullptr;
    last_end_ = std::chrono::steady_clock::now();
    if (error_) std::rethrow_exception(error_);
  }

 private:
  // Every task has run and no worker is still inside the region. The
  // counters change under mutex_ but are read here without it, to spin.
  bool finished() const { return remaining_.load() == 0 && busy_.load() == 0; }

  static void run_serially(int64_t ntasks, const TaskRef& task) {
    const bool was_inside = t_inside_task;
    t_inside_task = true;
    try {
      for (int64_t i = 0; i < ntasks; ++i) task(i);
    } catch (...) {
      t_inside_task = was_inside;
      throw;
    }
    t_inside_task = was_inside;
  }

  void ensure_workers(int count) {
    while (static_cast<int>(workers_started_) < count) {
      std::thread([this] { worker_loop(); }).detach();
      ++workers_started_;
    }
  }

  // Takes tasks until none are left; records the first exception.
  void work() {
    t_inside_task = true;
    int64_t done_here = 0;
    for (;;) {
      const int64_t i = next_.fetch_add(1);
      if (i >= ntasks_) break;
      try {
        (*task_)(i);
      } catch (...) {
        std::lock_guard<std::mutex> lock(mutex_);
        if (!error_) error_ = std::current_exception();
      }
      ++done_here;
    }
    t_inside_task = false;
    std::lock_guard<std::mutex> lock(mutex_);
    remaining_.fetch_sub(done_here);
    if (finished()) done_.notify_all();
  }

  void worker_loop() {
    uint64_t seen = 0;
    std::unique_lock<std::mutex> lock(mutex_);
    for (;;) {
      if (generation_.load() == seen) {
        lock.unlock();
        const auto spin = idle_spin_.load() ? spin_.load() : std::chrono::microseconds(0);
        spin_until(spin, [&] { return generation_.load() != seen; });
        lock.lock();
      }
      wake_.wait(lock, [&] { return generation_.load() != seen; });
      seen = generation_.load();
      if (active_workers_ <= 0) continue;
      --active_workers_;
      busy_.fetch_add(1);
      lock.unlock();
      work();
      lock.lock();
      busy_.fetch_sub(1);
      if (finished()) done_.notify_all();
    }
  }

  // With more threads than cores a spinning thread takes a core from one
  // with work (as OpenMP runtimes throttle their spin), so threads sleep
  // at once then.
  static std::chrono::microseconds spin_time(int threads) {
    return threads <= usable_cores() ? kSpinTime : std::chrono::microseconds(0);
  }

  int threads_;
  std::atomic<std::chrono::microseconds> spin_;
  // Whether workers spin after this region: it came within kSpinTime of
  // the end of the one before (last_end_, under run_mutex_).
  std::atomic<bool> idle_spin_{true};
  std::chrono::steady_clock::time_point last_end_{};
  std::mutex run_mutex_;  // one parallel region at a time
  std::mutex mutex_;
  std::condition_variable wake_;
  std::condition_variable done_;
  const TaskRef* task_ = nullptr;
  int64_t ntasks_ = 0;
  std::atomic<int64_t> next_{0};
  std::atomic<int64_t> remaining_{0};
  int64_t active_workers_ = 0;
  std::atomic<int> busy_{0};
  std::atomic<uint64_t> generation_{0};
  unsigned workers_started_ = 0;
  std::exception_ptr error_;
};

Pool* g_pool = nullptr;
std::once_flag g_pool_once;

// A forked child has none of the parent's worker threads: give it a fresh
// pool (the old one is leaked on purpose; its mutexes may be held).
void reset_pool_in_child() {
  g_pool = new Pool(g_pool != nullptr ? g_pool->threads() : threads_from_environment());
}

Pool& pool() {
  std::call_once(g_pool_once, [] {
    g_pool = new Pool(threads_from_environment());
    pthread_atfork(nullptr, nullptr, reset_pool_in_child);
  });
  return *g_pool;
}

}  // namespace

int num_threads() { return pool().threads(); }

void set_num_threads(int n) { pool().resize(std::max(1, std::min(n, kMaxThreads))); }

void parallel_for(int64_t ntasks, TaskRef task) { pool().run(ntasks, task, kMaxThreads); }

void parallel_for(int64_t ntasks, TaskRef task, int max_threads) {
  pool().run(ntasks, task, max_threads);
}

}  // namespace cpu
}  // namespace fusednn
