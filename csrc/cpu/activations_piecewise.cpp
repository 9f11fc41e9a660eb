// The CPU kernels of the piecewise activations: relu, leaky_relu, elu,
// selu, hardsigmoid, hardswish and hardtanh (cpu/activation_loops.h). One
// of several files of activation kernels, so that they compile in
// parallel; compiled once per ISA.
#include "cpu/activation_loops.h"

FUSEDNN_ACTIVATION_KERNELS(act::Relu)
FUSEDNN_ACTIVATION_KERNELS(act::LeakyRelu)
FUSEDNN_ACTIVATION_KERNELS(act::Elu)
FUSEDNN_ACTIVATION_KERNELS(act::Selu)
FUSEDNN_ACTIVATION_KERNELS(act::Hardsigmoid)
FUSEDNN_ACTIVATION_KERNELS(act::Hardswish)
FUSEDNN_ACTIVATION_KERNELS(act::Hardtanh)
