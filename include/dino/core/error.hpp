// dino/core/error.hpp: the exception hierarchy.
//
// Every error the library raises derives from dino::error and its message names what was
// wrong: the tensor or file, what was expected and what was found. Callers catch the
// category they can act on (a shape_error is a programming mistake, an io_error a bad
// file, a numeric_error a diverging run, a config_error a bad hyper-parameter).
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>

namespace dino {

struct error : std::runtime_error {
  using std::runtime_error::runtime_error;
};
/// A tensor whose shape does not fit the operation.
struct shape_error : error {
  using error::error;
};
/// A file that cannot be read, written or trusted.
struct io_error : error {
  using error::error;
};
/// A non-finite or otherwise unusable value.
struct numeric_error : error {
  using error::error;
};
/// A hyper-parameter or assembly that makes no sense.
struct config_error : error {
  using error::error;
};

namespace detail {
template <class... Parts>
std::string concat(Parts&&... parts) {
  std::ostringstream os;
  (os << ... << std::forward<Parts>(parts));
  return os.str();
}
}  // namespace detail

/// Throws E with the streamed parts as message when cond is false.
template <class E = error, class... Parts>
inline void require(bool cond, Parts&&... parts) {
  if (!cond) throw E(detail::concat(std::forward<Parts>(parts)...));
}

}  // namespace dino
