// tests/golden/golden.hpp: reader for the golden files of tests/golden/data and the error
// metrics the golden tests use.
//
// The files are written by tests/golden/gen/gen_objective.py (a PyTorch reference; see
// tests/golden/gen/README.md). Format, little endian:
//
//   char[4]  magic "DGLD"
//   u32      version (1)
//   u32      number of tensors
//   per tensor:
//     u32    name length, then the name bytes (no terminator)
//     u32    dtype: 0 = float32, 1 = float64
//     u32    ndim (0 for a scalar)
//     i64    dims[ndim]
//     data   prod(dims) values of the dtype, row-major
//
// Names are paths such as "nll1/param/mlp.0.weight"; parameters use their PyTorch
// state_dict names after the case prefix.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <stdexcept>
#include <string>
#include <vector>

#include <doctest/doctest.h>

namespace dino_golden {

/// The path of a file of tests/golden/data. The build names the folder (DINO_GOLDEN_DIR, an
/// absolute path in the source tree); the environment variable of the same name overrides it,
/// for test binaries run from another copy of the tree (scripts/gpu-check on a lent machine).
inline std::string data_path(const std::string& file) {
  const char* env = std::getenv("DINO_GOLDEN_DIR");
  return std::string(env && *env ? env : DINO_GOLDEN_DIR) + "/" + file;
}

struct tensor {
  std::string name;
  int dtype = 0;  ///< 0 float32, 1 float64
  std::vector<std::int64_t> dims;
  std::vector<double> values;  ///< every value widened to double (exact for both dtypes)
  std::vector<float> f32;      ///< the stored floats when dtype == 0

  std::int64_t numel() const {
    std::int64_t n = 1;
    for (auto d : dims) n *= d;
    return n;
  }
  double scalar() const {
    if (values.size() != 1) throw std::runtime_error("golden: '" + name + "' is not a scalar");
    return values[0];
  }
  std::string shape_str() const {
    std::string s = "[";
    for (std::size_t i = 0; i < dims.size(); ++i) s += (i ? ", " : "") + std::to_string(dims[i]);
    return s + "]";
  }
};

class file {
 public:
  file() = default;
  explicit file(const std::string& path) : path_(path) {
    std::ifstream in(path, std::ios::binary);
    if (!in) throw std::runtime_error("golden: cannot open " + path);
    char magic[4];
    read(in, magic, 4);
    if (std::memcmp(magic, "DGLD", 4) != 0) throw std::runtime_error("golden: bad magic in " + path);
    const std::uint32_t version = u32(in), count = u32(in);
    if (version != 1) throw std::runtime_error("golden: unsupported version " + std::to_string(version) + " in " + path);
    for (std::uint32_t i = 0; i < count; ++i) {
      tensor t;
      const std::uint32_t len = u32(in);
      t.name.resize(len);
      read(in, t.name.data(), len);
      t.dtype = static_cast<int>(u32(in));
      const std::uint32_t ndim = u32(in);
      if (t.dtype != 0 && t.dtype != 1) throw std::runtime_error("golden: '" + t.name + "': bad dtype");
      if (ndim > 8) throw std::runtime_error("golden: '" + t.name + "': bad rank");
      for (std::uint32_t d = 0; d < ndim; ++d) {
        std::int64_t v;
        read(in, &v, 8);
        t.dims.push_back(v);
      }
      const auto n = static_cast<std::size_t>(t.numel());
      t.values.resize(n);
      if (t.dtype == 0) {
        t.f32.resize(n);
        read(in, t.f32.data(), n * 4);
        for (std::size_t j = 0; j < n; ++j) t.values[j] = t.f32[j];
      } else {
        read(in, t.values.data(), n * 8);
      }
      const std::string key = t.name;
      if (!tensors_.emplace(key, std::move(t)).second) throw std::runtime_error("golden: duplicate '" + key + "'");
    }
    in.peek();
    if (!in.eof()) throw std::runtime_error("golden: trailing bytes in " + path);
  }

  bool has(const std::string& name) const { return tensors_.count(name) != 0; }
  const tensor& operator[](const std::string& name) const {
    auto it = tensors_.find(name);
    if (it == tensors_.end()) throw std::runtime_error("golden: no tensor '" + name + "' in " + path_);
    return it->second;
  }
  double scalar(const std::string& name) const { return (*this)[name].scalar(); }
  const std::map<std::string, tensor>& all() const { return tensors_; }
  const std::string& path() const { return path_; }

 private:
  static void read(std::ifstream& in, void* p, std::size_t n) {
    in.read(static_cast<char*>(p), static_cast<std::streamsize>(n));
    if (!in) throw std::runtime_error("golden: truncated file");
  }
  // The generator writes little endian; every supported host is little endian too.
  static std::uint32_t u32(std::ifstream& in) {
    std::uint32_t v;
    read(in, &v, 4);
    return v;
  }

  std::string path_;
  std::map<std::string, tensor> tensors_;
};

/// Errors of `actual` against `expected`:
///   rel_norm  ||a - b|| / ||b||              (||b|| = 0: ||a - b||)
///   elem      max_i |a_i - b_i| / (max_j |b_j| + abs_floor)
///   worst     the index of the largest |a_i - b_i|
struct error {
  double rel_norm = 0, elem = 0, max_abs = 0;
  std::int64_t worst = -1;
  double worst_actual = 0, worst_expected = 0;
  bool finite = true;
};

template <class A>
inline error compare(const A* actual, const std::vector<double>& expected, double abs_floor = 1e-30) {
  error e;
  double dn = 0, bn = 0, bmax = 0;
  for (std::size_t i = 0; i < expected.size(); ++i) {
    const double a = double(actual[i]), b = expected[i], d = std::abs(a - b);
    if (!std::isfinite(a)) e.finite = false;
    dn += d * d;
    bn += b * b;
    bmax = std::max(bmax, std::abs(b));
    if (d > e.max_abs || e.worst < 0) {
      e.max_abs = d;
      e.worst = static_cast<std::int64_t>(i);
      e.worst_actual = a;
      e.worst_expected = b;
    }
  }
  e.rel_norm = bn > 0 ? std::sqrt(dn / bn) : std::sqrt(dn);
  e.elem = e.max_abs / (bmax + abs_floor);
  if (!e.finite) e.rel_norm = e.elem = INFINITY;
  return e;
}

/// Loads every tensor of `layout` from "<prefix><name>"; the shapes must match and every
/// stored "<prefix>..." tensor must be in the layout.
template <class Params>
void load_params(const file& g, const std::string& prefix, Params& P) {
  P.fill_zero();
  for (const auto& e : P.layout().entries()) {
    const std::string key = prefix + e.name;
    REQUIRE_MESSAGE(g.has(key), "the golden file has no tensor ", key);
    const tensor& t = g[key];
    REQUIRE(t.dtype == 0);
    REQUIRE_MESSAGE(static_cast<int>(t.dims.size()) == e.shape.rank, key, ": golden shape ", t.shape_str(),
                    ", layout shape ", e.shape.str());
    for (int d = 0; d < e.shape.rank; ++d) REQUIRE_MESSAGE(t.dims[std::size_t(d)] == e.shape[d], key, ": golden shape ",
                                                           t.shape_str(), ", layout shape ", e.shape.str());
    std::copy(t.f32.begin(), t.f32.end(), P.data() + e.offset);
  }
  int stored = 0;
  for (const auto& kv : g.all())
    if (kv.first.rfind(prefix, 0) == 0) {
      ++stored;
      CHECK_MESSAGE(P.layout().find(kv.first.substr(prefix.size())) != nullptr, "the layout has no tensor for ",
                    kv.first);
    }
  CHECK(stored == static_cast<int>(P.layout().entries().size()));
}

}  // namespace dino_golden
