// dino/ssl/diagnostics.hpp: collapse diagnostics from the loss's own tensors.
//
// DINO can collapse two ways (paper §5.3): to a uniform output, where the teacher entropy
// and the loss both sit at ln K, or to one dominant dimension, where the teacher entropy
// falls to 0. With H the mean entropy of the teacher targets and CE the distillation loss:
//   KL(teacher || student) = CE - H        (averaged over the same pairs as the loss)
// The flag `collapsed` is raised when |CE - ln K| < rel_tol * ln K (the uniform collapse that
// reference users report as a loss stuck at 11.09 for K = 65,536, dino-spec §7 item 2).
#pragma once

#include <cmath>
#include <cstdint>

namespace dino::ssl {

struct collapse_diagnostics {
  double loss = 0;             ///< cross-entropy (nats)
  double teacher_entropy = 0;  ///< mean entropy of the teacher targets (nats)
  double kl = 0;               ///< loss - teacher_entropy
  double ln_k = 0;             ///< log of the number of prototypes
  bool collapsed = false;      ///< loss within rel_tol * ln K of ln K
};

inline collapse_diagnostics diagnose(double loss, double teacher_entropy, std::int64_t K, double rel_tol = 0.01) {
  collapse_diagnostics d;
  d.loss = loss;
  d.teacher_entropy = teacher_entropy;
  d.kl = loss - teacher_entropy;
  d.ln_k = std::log(double(K));
  d.collapsed = std::fabs(loss - d.ln_k) < rel_tol * d.ln_k;
  return d;
}

}  // namespace dino::ssl
