// Runs a kernel with the GIL released, for every binding of both modules.
//
// Not pybind11's gil_scoped_release: its destructor takes the GIL back, and
// a daemon thread that takes it back while the interpreter is finalizing is
// ended by CPython with pthread_exit. That forced unwinding cannot leave a
// destructor (they are noexcept), so std::terminate aborted the process at
// exit. Taking the GIL back in a plain function lets the unwinding pass up
// to the thread's start (pybind11 rethrows it), as CPython intends.
#pragma once

#include <Python.h>

#include <utility>

namespace fusednn {
namespace bindings {

template <class Kernel> void run_without_gil(Kernel&& kernel) {
  PyThreadState* const state = PyEval_SaveThread();
  try {
    std::forward<Kernel>(kernel)();
  } catch (...) {
    PyEval_RestoreThread(state);
    throw;
  }
  PyEval_RestoreThread(state);
}

}  // namespace bindings
}  // namespace fusednn
