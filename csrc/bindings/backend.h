// The kernels one compiled module binds: the binding files (one per kernel
// family) are compiled once for each module and call `Backend`, which is
// the CPU adapter in _cpu and the CUDA adapter in _cuda (the _cuda target
// defines FUSEDNN_BINDINGS_CUDA). Both adapters take Operands and expose
// the same functions, so the Python layer calls either with one signature.
#pragma once

#if defined(FUSEDNN_BINDINGS_CUDA)
#include "bindings/backend_cuda.h"
#else
#include "bindings/backend_cpu.h"
#endif
