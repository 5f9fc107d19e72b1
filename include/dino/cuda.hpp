// dino/cuda.hpp: the CPU library plus the CUDA policy. Compiled by nvcc only (.cu files);
// link dino::cuda (CUDA runtime and cuBLASLt). The operations of policy/cuda/ are found from
// a cuda_policy argument exactly as the CPU ones are from a cpu_policy.
#pragma once

#if !defined(__CUDACC__)
#error "dino/cuda.hpp is compiled by nvcc only: include <dino/dino.hpp> in host-only translation units"
#endif

#include "dino/dino.hpp"
#include "dino/policy/cuda/attention.cuh"
#include "dino/policy/cuda/bf16_operands.cuh"
#include "dino/policy/cuda/context.cuh"
#include "dino/policy/cuda/gemm.cuh"
#include "dino/policy/cuda/graph.cuh"
#include "dino/policy/cuda/loss.cuh"
#include "dino/policy/cuda/memory.cuh"
#include "dino/policy/cuda/nn_ops.cuh"
#include "dino/policy/cuda/optim.cuh"
#include "dino/policy/cuda/parallel.cuh"
#include "dino/policy/cuda/policy.cuh"
#include "dino/policy/cuda/profile.cuh"
#include "dino/policy/cuda/reduce.cuh"
#include "dino/policy/cuda/variants.cuh"
