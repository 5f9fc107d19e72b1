// dino/ssl/predictor.hpp: the optional predictor of a method (BYOL; DINO's Table 7 row 6), and
// fixed_dims, which gives any part sizes known at compile time.
//
// A predictor is a network_module (ssl/concepts.hpp) that runs on the student only, after the
// head: loss(predictor(head(backbone(crop))), targets(teacher)). Its parameters are in the
// method's layout under "predictor.*", after the backbone's and the head's, and are trained
// with the rest; the teacher neither runs them nor follows them (the teacher update covers
// the layout up to them). Its input and output sizes must equal the head's output (K).
//
//   no_predictor       the default: no predictor (nothing is planned or run for it)
//   mlp_predictor      nn::mlp, e.g. predictor_config(K, hidden): Linear(K, hidden), GELU,
//                      Linear(hidden, K). BYOL's is Linear, BatchNorm, ReLU, Linear (this
//                      library has no BatchNorm; GELU stands in for ReLU as in the DINO head).
//
// fixed_dims<Part, In, Out> is Part with `static_in_dim` / `static_out_dim`: the method then
// static_asserts that the assembly fits (backbone -> head -> predictor) at compile time, and
// the constructor checks that the configuration gives those sizes (config_error otherwise).
#pragma once

#include <cstdint>
#include <string>
#include <utility>

#include "dino/core/error.hpp"
#include "dino/core/param_store.hpp"
#include "dino/nn/mlp.hpp"
#include "dino/ssl/concepts.hpp"

namespace dino::ssl {

/// No predictor: the method's default.
struct no_predictor {
  struct config_type {};
  no_predictor() = default;
  no_predictor(config_type, param_layout&, const std::string&) {}
};

/// A part that can serve as a predictor: a network_module.
template <class P, class T = float, class Policy = cpu_policy>
concept predictor_part = std::is_same_v<P, no_predictor> || network_module<P, T, Policy>;

/// The MLP predictor (BYOL-style).
using mlp_predictor = nn::mlp;

/// Linear(K, hidden), GELU, Linear(hidden, K) (PyTorch's Linear init).
inline nn::mlp_config predictor_config(std::int64_t K, std::int64_t hidden) {
  nn::mlp_config c{{K, hidden, K}, false};
  c.weight_init = param_init::kaiming_uniform;
  return c;
}

/// Part with its input and output sizes fixed at compile time (dynamic_dim: either left free).
template <class Part, std::int64_t In, std::int64_t Out>
class fixed_dims : public Part {
 public:
  static constexpr std::int64_t static_in_dim = In;
  static constexpr std::int64_t static_out_dim = Out;
  using config_type = typename Part::config_type;
  fixed_dims() = default;
  fixed_dims(config_type c, param_layout& layout, const std::string& prefix) : Part(std::move(c), layout, prefix) {
    require<config_error>(In == dynamic_dim || this->in_dim() == In, "fixed_dims: ", prefix,
                          " has input size ", this->in_dim(), ", its type says ", In);
    require<config_error>(Out == dynamic_dim || this->out_dim() == Out, "fixed_dims: ", prefix,
                          " has output size ", this->out_dim(), ", its type says ", Out);
  }
};

}  // namespace dino::ssl
