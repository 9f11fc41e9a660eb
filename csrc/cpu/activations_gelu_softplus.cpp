// The CPU kernels of gelu (erf and tanh forms), softplus (unit and other
// beta) and mish (cpu/activation_loops.h). One of several files of
// activation kernels, so that they compile in parallel; compiled once per
// ISA.
#include "cpu/activation_loops.h"

FUSEDNN_ACTIVATION_KERNELS(act::GeluErf)
FUSEDNN_ACTIVATION_KERNELS(act::GeluTanh)
FUSEDNN_ACTIVATION_KERNELS(act::SoftplusUnitBeta)
FUSEDNN_ACTIVATION_KERNELS(act::Softplus)
FUSEDNN_ACTIVATION_KERNELS(act::Mish)
