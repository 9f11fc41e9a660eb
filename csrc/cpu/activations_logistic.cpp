// The CPU kernels of the activations built on the logistic function:
// sigmoid, tanh and silu (cpu/activation_loops.h). One of several files
// of activation kernels, so that they compile in parallel; compiled once
// per ISA.
#include "cpu/activation_loops.h"

FUSEDNN_ACTIVATION_KERNELS(act::Sigmoid)
FUSEDNN_ACTIVATION_KERNELS(act::Tanh)
FUSEDNN_ACTIVATION_KERNELS(act::Silu)
