// dino/policy/cpu.hpp: the CPU policy (Eigen GEMMs, OpenMP row and element runners,
// reductions). The operations are found by argument-dependent lookup from a cpu_policy.
#pragma once

#include "dino/policy/cpu/adamw_kernel.hpp"
#include "dino/policy/cpu/gelu_kernel.hpp"
#include "dino/policy/cpu/gemm.hpp"
#include "dino/policy/cpu/memory.hpp"
#include "dino/policy/cpu/parallel.hpp"
#include "dino/policy/cpu/reduce.hpp"
#include "dino/policy/cpu/softmax_rows.hpp"
#include "dino/policy/cpu/vexp.hpp"
#include "dino/policy/policy.hpp"
