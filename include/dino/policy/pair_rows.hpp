// dino/policy/pair_rows.hpp: the arguments of the GPU row kernels of the pair losses
// (ssl/mse_loss.hpp, ssl/info_nce.hpp, ssl/nt_xent.hpp; policy/cuda/variants.cuh). The CPU
// parts run their own loops and do not use it.
#pragma once

#include <cstdint>

namespace dino {

/// The rows of a loss over crop pairs: student s [n_crops * B, K] (crop-major), teacher rows
/// q [n_global * B, K].
template <class T>
struct pair_rows_desc {
  const T* s = nullptr;
  const T* q = nullptr;
  T* row_loss = nullptr;
  T* ds = nullptr;  ///< null: no gradient
  std::int64_t B = 0, K = 0;
  int n_crops = 2, n_global = 2;
  double scale = 0;    ///< the gradient's factor (each loss says which)
  double inv_tau = 1;  ///< 1 / temperature (InfoNCE, NT-Xent)
  bool accumulate = false;
};

}  // namespace dino
