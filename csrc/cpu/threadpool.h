// A small persistent thread pool for the CPU kernels. Work is split into
// tasks by the caller; the pool only runs them. Results never depend on the
// thread count because every kernel fixes its own partition of the work.
#pragma once

#include <cstdint>
#include <type_traits>

namespace fusednn {
namespace cpu {

// The most threads the pool runs; set_num_threads and the environment
// variables are held to [1, kMaxThreads].
constexpr int kMaxThreads = 1024;

// Threads used by kernels: FUSEDNN_NUM_THREADS, else OMP_NUM_THREADS, else
// the number of cores, until set_num_threads changes it.
int num_threads();
void set_num_threads(int n);

// Which threads run a parallel region. openmp: the calling thread's
// OpenMP team, where the process has GNU OpenMP (libgomp) loaded, as
// PyTorch's CPU builds do, and this thread is in no OpenMP region;
// automatic: the same, but only while the team's other members are awake
// (running or spinning, as after PyTorch's operators) and the caller has
// been busy; own: the pool's own workers. Where the team is not used the
// pool's own workers run the region. FUSEDNN_THREAD_POOL (auto, openmp,
// fusednn) sets the first choice.
enum class PoolChoice : int { automatic, openmp, own };
void set_pool_choice(PoolChoice choice);
PoolChoice pool_choice();
// Whether a parallel region started from this thread may run on the
// OpenMP team (the runtime is loaded, the choice allows it, more than one
// thread).
bool openmp_team_available();

// A task callable as task(i), referred to, not owned: it must outlive the
// parallel_for it is passed to (a lambda written in the call does). A
// std::function copied each kernel's lambda (to the heap where its
// captures pass 16 bytes) and compiled a manager function (copy, destroy,
// type query) for every lambda type in every ISA build: about 135 KB of
// the module's code, none of which the pool needs.
class TaskRef {
 public:
  template <class Task, class = std::enable_if_t<!std::is_same_v<std::decay_t<Task>, TaskRef>>>
  TaskRef(const Task& task)
      : task_(&task), call_([](const void* t, int64_t i) { (*static_cast<const Task*>(t))(i); }) {}
  void operator()(int64_t i) const { call_(task_, i); }

 private:
  const void* task_;
  void (*call_)(const void*, int64_t);
};

// Runs task(i) for i in [0, ntasks) on the pool and the calling thread and
// returns when all are done. The first exception thrown by a task is
// rethrown here. Calls made from inside a task, or while another caller is
// using the pool, run serially on the calling thread.
void parallel_for(int64_t ntasks, TaskRef task);
// The same on at most max_threads threads (1: the calling thread alone, for
// work too small to pay for a hand-off whose tasks are fixed by the shape).
// An overload, not a default argument, so that the other call sites pass
// nothing more.
void parallel_for(int64_t ntasks, TaskRef task, int max_threads);

}  // namespace cpu
}  // namespace fusednn
