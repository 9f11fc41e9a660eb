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
//
// Where the process has GNU OpenMP loaded (PyTorch's CPU builds), regions
// run on the calling thread's OpenMP team instead while its members are
// awake (PoolChoice::automatic): after each PyTorch operator its OpenMP
// workers spin for milliseconds on the other cores, so the pool's own
// workers, woken there, found those cores taken and two threads ran at one
// thread's speed (a gelu of 2^20 elements interleaved with PyTorch's:
// 0.85x PyTorch on two threads, 1.4-1.5x on the team, whose spinning
// workers are the ones that take the work).
//
// The pool's own workers keep off the core the caller runs on (an
// affinity mask of the caller's cores less its own, set again only when
// the caller has moved). On a small virtual machine the guest scheduler
// packs threads onto as few virtual cores as it can: a worker woken after
// an idle pause was placed on the caller's core and, with the caller,
// stayed there for milliseconds, so two threads ran at one thread's speed.
// Before regions went to the OpenMP team, the mask held the worker on the
// core PyTorch's spinning worker had, and slowed a patched training step
// to 0.69-0.82x stock; with the team taking those regions it no longer
// does (1.12-1.26x, against 0.99-1.18x without the mask).
#include "cpu/threadpool.h"

#include <pthread.h>
#if defined(__linux__)
#include <sched.h>
#endif
#if defined(__linux__) && defined(__GLIBC__)
#include <dlfcn.h>
#include <link.h>
#include <time.h>
#define FUSEDNN_OPENMP_TEAM 1
#endif

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
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

std::atomic<PoolChoice> g_choice{PoolChoice::automatic};
// Set in a forked child: its OpenMP runtime's team threads were not forked
// with it, and a GNU OpenMP region there can wait on them for ever.
std::atomic<bool> g_forked_child{false};

PoolChoice choice_from_environment() {
  const char* value = std::getenv("FUSEDNN_THREAD_POOL");
  if (value == nullptr) return PoolChoice::automatic;
  if (std::strcmp(value, "fusednn") == 0) return PoolChoice::own;
  if (std::strcmp(value, "openmp") == 0) return PoolChoice::openmp;
  return PoolChoice::automatic;
}

// GNU OpenMP's entry points in this process, looked up among the objects
// already loaded (fusednn never loads an OpenMP runtime itself), again
// whenever the process has loaded more since the last look.
struct OpenMpRuntime {
  void (*parallel)(void (*)(void*), void*, unsigned, unsigned) = nullptr;
  int (*in_parallel)() = nullptr;
  int (*thread_num)() = nullptr;
  int (*team_size)() = nullptr;
};

#if defined(FUSEDNN_OPENMP_TEAM)
class OpenMpLookup {
 public:
  // Not thread-safe: called under the pool's run_mutex_.
  const OpenMpRuntime* find() {
    unsigned long long adds = 0;
    dl_iterate_phdr(
        [](dl_phdr_info* info, size_t, void* out) {
          *static_cast<unsigned long long*>(out) = info->dlpi_adds;
          return 1;
        },
        &adds);
    if (adds != adds_seen_) {
      adds_seen_ = adds;
      if (!found_) found_ = dl_iterate_phdr(&OpenMpLookup::match, &runtime_) != 0;
    }
    return found_ ? &runtime_ : nullptr;
  }

 private:
  static int match(dl_phdr_info* info, size_t, void* out) {
    const char* path = info->dlpi_name;
    if (path == nullptr || *path == '\0') return 0;
    const char* slash = std::strrchr(path, '/');
    if (std::strncmp(slash != nullptr ? slash + 1 : path, "libgomp", 7) != 0) return 0;
    // A reference to the loaded object only: RTLD_NOLOAD loads nothing.
    void* handle = dlopen(path, RTLD_NOW | RTLD_NOLOAD);
    if (handle == nullptr) return 0;
    OpenMpRuntime found;
    found.parallel = reinterpret_cast<decltype(found.parallel)>(dlsym(handle, "GOMP_parallel"));
    found.in_parallel = reinterpret_cast<decltype(found.in_parallel)>(dlsym(handle, "omp_in_parallel"));
    found.thread_num = reinterpret_cast<decltype(found.thread_num)>(dlsym(handle, "omp_get_thread_num"));
    found.team_size = reinterpret_cast<decltype(found.team_size)>(dlsym(handle, "omp_get_num_threads"));
    if (found.parallel == nullptr || found.in_parallel == nullptr || found.thread_num == nullptr ||
        found.team_size == nullptr)
      return 0;
    *static_cast<OpenMpRuntime*>(out) = found;
    return 1;
  }

  unsigned long long adds_seen_ = ~0ull;
  OpenMpRuntime runtime_;
  bool found_ = false;
};

// Whether the team's other members are awake: running, or spinning as an
// OpenMP runtime's idle workers do for milliseconds after a region (their
// own or PyTorch's), rather than asleep. Read from their CPU clocks: a
// member that used nearly all the time since the last look is running.
// Asleep, a member must first be woken, and the runtime waits for every
// member at the end of a region, tasks or none: on this virtual machine
// a member woken after 15 ms asleep joined milliseconds late (two threads
// on a gelu of 2^15 elements took up to 225 times one thread's time),
// where the pool's own caller takes a late worker's tasks itself.
class TeamWatch {
 public:
  TeamWatch() {
    for (auto& c : clocks_) c.store(kUnknown);
    for (auto& c : cores_) c.store(-1);
    for (double& c : cpu_) c = -1.0;
  }

  // The calling member notes its clock and the core it ran on (any member
  // but the caller).
  void note_member(int member) {
    if (member < 1 || member >= kMembers) return;
    clockid_t clock;
    if (pthread_getcpuclockid(pthread_self(), &clock) == 0) clocks_[member].store(clock);
    cores_[member].store(sched_getcpu());
  }

  // After a region of `count` members whose caller ran on core `core`: a
  // member that shared the caller's core (the guest packs threads onto few
  // cores) spins there between regions and takes half the caller's time,
  // as an OpenMP runtime's idle worker does not yield: the team is left
  // alone for kPackedPause.
  void note_region(int count, int core) {
    for (int member = 1; member < count && member < kMembers; ++member) {
      if (cores_[member].load() == core) {
        packed_until_ = std::chrono::steady_clock::now() + kPackedPause;
        return;
      }
    }
  }

  // Whether members 1 to count - 1 are all awake; true where one is not
  // known yet, so that a first region on the team learns them. Under the
  // pool's run_mutex_.
  bool awake(int count) {
    const auto now = std::chrono::steady_clock::now();
    if (now < packed_until_ || !caller_busy(now)) return false;
    if (now - looked_ < kWindow) return awake_;
    const double window = std::chrono::duration<double>(now - looked_).count();
    looked_ = now;
    bool all = true;
    for (int member = 1; member < count && member < kMembers; ++member) {
      const clockid_t clock = clocks_[member].load();
      timespec ts;
      if (clock == kUnknown || clock_gettime(clock, &ts) != 0) {
        clocks_[member].store(kUnknown);
        cpu_[member] = -1.0;
        continue;  // learnt in the next region
      }
      const double cpu = double(ts.tv_sec) + 1e-9 * double(ts.tv_nsec);
      const double used = cpu_[member] < 0 ? 0.0 : cpu - cpu_[member];
      cpu_[member] = cpu;
      if (window - used > kMostIdle) all = false;
    }
    awake_ = all;
    return awake_;
  }

 private:
  // Whether the calling thread has kept busy for the last kBusyStretch:
  // a caller that slept (a pause between calls) may wake onto the core an
  // idle member spins on, and share it with that member's spin, so the
  // team waits for a stretch of busy calls (a training loop's).
  static bool caller_busy(std::chrono::steady_clock::time_point now) {
    thread_local std::chrono::steady_clock::time_point looked{}, busy_since{};
    thread_local double cpu_then = -1.0;
    thread_local bool busy = false;
    if (now - looked < kWindow) return busy && now - busy_since >= kBusyStretch;
    timespec ts;
    if (clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts) != 0) return false;
    const double cpu = double(ts.tv_sec) + 1e-9 * double(ts.tv_nsec);
    const double window = std::chrono::duration<double>(now - looked).count();
    const bool was_busy = cpu_then >= 0 && cpu - cpu_then >= 0.5 * window;
    if (!was_busy) {
      busy_since = now;
    } else if (!busy) {
      busy_since = looked;
    }
    busy = was_busy;
    looked = now;
    cpu_then = cpu;
    return busy && now - busy_since >= kBusyStretch;
  }

  static constexpr int kMembers = 64;
  static constexpr clockid_t kUnknown = clockid_t(-1);
  // Looks closer together reuse the last answer: over a few microseconds
  // a sleeping member's clock tells nothing.
  static constexpr std::chrono::microseconds kWindow{200};
  // Idle time since the last look that still counts as awake (the host's
  // interruptions, a scheduler tick).
  static constexpr double kMostIdle = 1e-3;
  static constexpr std::chrono::milliseconds kPackedPause{20};
  static constexpr std::chrono::milliseconds kBusyStretch{5};
  std::atomic<clockid_t> clocks_[kMembers] = {};
  std::atomic<int> cores_[kMembers] = {};
  std::chrono::steady_clock::time_point packed_until_{};
  double cpu_[kMembers] = {};
  std::chrono::steady_clock::time_point looked_{};
  bool awake_ = true;

};
#else
class OpenMpLookup {
 public:
  const OpenMpRuntime* find() { return nullptr; }
};
class TeamWatch {
 public:
  void note_member(int) {}
  void note_region(int, int) {}
  bool awake(int) { return false; }
};
#endif

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

  // Whether regions from this thread may run on the OpenMP team.
  bool openmp_available() {
    std::lock_guard<std::mutex> run_lock(run_mutex_);
    return threads_ > 1 && openmp_runtime() != nullptr;
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
    if (const OpenMpRuntime* team = openmp_team()) {
      run_on_team(*team, ntasks, task, std::min(threads_, max_threads));
      return;
    }
    ensure_workers(threads_ - 1);
    keep_workers_off_this_core();
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
    while (static_cast<int>(workers_.size()) < count) {
      std::thread worker([this] { worker_loop(); });
      workers_.push_back(worker.native_handle());
      worker.detach();
      workers_off_cpu_ = kMasksUnknown;
    }
  }

  // The OpenMP runtime whose team this thread's regions may use, or null.
  // Under run_mutex_.
  const OpenMpRuntime* openmp_runtime() {
    if (g_choice.load() == PoolChoice::own || g_forked_child.load()) return nullptr;
    const OpenMpRuntime* runtime = openmp_.find();
    // Inside an OpenMP region the team is taken: the pool's workers serve.
    return runtime != nullptr && runtime->in_parallel() == 0 ? runtime : nullptr;
  }

  // The team to run this region on, or null for the pool's own workers.
  const OpenMpRuntime* openmp_team() {
    const OpenMpRuntime* runtime = openmp_runtime();
    if (runtime == nullptr) return nullptr;
    return g_choice.load() == PoolChoice::openmp || watch_.awake(threads_) ? runtime : nullptr;
  }

  // The region on the OpenMP team of `threads` threads (the caller one of
  // them), which take tasks from the shared counter as the pool's workers
  // do; the runtime returns once every one of them is done.
  void run_on_team(const OpenMpRuntime& team, int64_t ntasks, const TaskRef& task, int threads) {
    task_ = &task;
    ntasks_ = ntasks;
    next_.store(0);
    members_done_.store(0);
    team_ = &team;
    error_ = nullptr;
    const auto members = static_cast<unsigned>(std::min<int64_t>(threads, ntasks));
    team.parallel([](void* pool) { static_cast<Pool*>(pool)->work_on_team(); }, this, members, 0);
    task_ = nullptr;
    if (error_) std::rethrow_exception(error_);
  }

  // A team member's share: tasks until none are left. Nothing may leave
  // the OpenMP runtime's frames by an exception. The caller (member 0)
  // then waits for the other members as the pool's own caller waits for
  // its workers, yielding its core now and then: the runtime's own barrier
  // spins without yielding, and a member woken onto the caller's core here
  // waited behind that spin until the next scheduler tick.
  void work_on_team() {
    take_tasks();
    const int member = team_->thread_num();
    if (member != 0) {
      watch_.note_member(member);
      members_done_.fetch_add(1);
      return;
    }
    const int others = team_->team_size() - 1;
    while (!spin_until(kSpinTime, [&] { return members_done_.load() == others; })) {
    }
    watch_.note_region(others + 1, sched_getcpu());
  }

  // Sets every worker's affinity to the caller's cores less the one it is
  // on, or to all of them with more threads than cores (a worker kept off
  // a core then only crowds the others). A caller held to one core leaves
  // the masks as they are. A system call per worker, made only when the
  // caller's core differs from the last region's: reading the core costs
  // tens of nanoseconds.
  void keep_workers_off_this_core() {
#if defined(__linux__)
    const int cpu = spin_.load().count() == 0 ? kAnyCpu : sched_getcpu();
    if (cpu == workers_off_cpu_) return;
    workers_off_cpu_ = cpu;
    cpu_set_t mask;
    if (sched_getaffinity(0, sizeof mask, &mask) != 0 || CPU_COUNT(&mask) < 2) return;
    if (cpu >= 0) CPU_CLR(cpu, &mask);
    for (pthread_t worker : workers_) pthread_setaffinity_np(worker, sizeof mask, &mask);
#endif
  }

  // Takes tasks from the shared counter until none are left, recording the
  // first exception (none leaves: an OpenMP runtime's frames may be
  // above); returns how many it ran.
  int64_t take_tasks() {
    const bool was_inside = t_inside_task;
    t_inside_task = true;
    int64_t ran = 0;
    for (int64_t i = next_.fetch_add(1); i < ntasks_; i = next_.fetch_add(1)) {
      try {
        (*task_)(i);
      } catch (...) {
        std::lock_guard<std::mutex> lock(mutex_);
        if (!error_) error_ = std::current_exception();
      }
      ++ran;
    }
    t_inside_task = was_inside;
    return ran;
  }

  // A share of a region on the pool's own workers.
  void work() {
    const int64_t ran = take_tasks();
    std::lock_guard<std::mutex> lock(mutex_);
    remaining_.fetch_sub(ran);
    if (finished()) done_.notify_all();
  }

  void worker_loop() {
#if defined(__linux__)
    // Named so that top, perf and the tests can tell the pool's threads.
    pthread_setname_np(pthread_self(), "fusednn-pool");
#endif
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

  static constexpr int kAnyCpu = -1;         // workers may run on every core
  static constexpr int kMasksUnknown = -2;   // a worker has not been given a mask
  int threads_;
  OpenMpLookup openmp_;  // under run_mutex_
  TeamWatch watch_;
  const OpenMpRuntime* team_ = nullptr;  // the team of the region running
  std::atomic<int> members_done_{0};
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
  // Under run_mutex_: the workers' threads, and the core their affinity
  // keeps them off (kAnyCpu, kMasksUnknown).
  std::vector<pthread_t> workers_;
  int workers_off_cpu_ = kMasksUnknown;
  std::exception_ptr error_;
};

Pool* g_pool = nullptr;
std::once_flag g_pool_once;

// A forked child has none of the parent's worker threads: give it a fresh
// pool (the old one is leaked on purpose; its mutexes may be held).
void reset_pool_in_child() {
  g_forked_child.store(true);
  g_pool = new Pool(g_pool != nullptr ? g_pool->threads() : threads_from_environment());
}

Pool& pool() {
  std::call_once(g_pool_once, [] {
    g_choice.store(choice_from_environment());
    g_pool = new Pool(threads_from_environment());
    pthread_atfork(nullptr, nullptr, reset_pool_in_child);
  });
  return *g_pool;
}

}  // namespace

int num_threads() { return pool().threads(); }

void set_num_threads(int n) { pool().resize(std::max(1, std::min(n, kMaxThreads))); }

void set_pool_choice(PoolChoice choice) {
  pool();  // the environment's choice first, so that this one stands
  g_choice.store(choice);
}

PoolChoice pool_choice() {
  pool();
  return g_choice.load();
}

bool openmp_team_available() { return pool().openmp_available(); }

void parallel_for(int64_t ntasks, TaskRef task) { pool().run(ntasks, task, kMaxThreads); }

void parallel_for(int64_t ntasks, TaskRef task, int max_threads) {
  pool().run(ntasks, task, max_threads);
}

}  // namespace cpu
}  // namespace fusednn
