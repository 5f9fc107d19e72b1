// dino/io/npy.hpp: NumPy .npy arrays (format versions 1.0, 2.0 and 3.0), read and written.
//
// read_npy checks everything before use: the magic string, the version, the header length
// against the file, the header dictionary ('descr', 'fortran_order', 'shape'), the dtype
// (little-endian float32 '<f4', float64 '<f8', uint8 '|u1'; read as float) and the data size
// against the shape. Failures throw io_error naming the file and what was wrong. C order
// only. write_npy writes float32, version 1.0, atomically (io/atomic_file.hpp).
#pragma once

#include <cstdint>
#include <cstring>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include "dino/core/error.hpp"
#include "dino/io/atomic_file.hpp"

namespace dino::io {

struct npy_array {
  std::vector<std::int64_t> shape;
  std::vector<float> data;  ///< C order, converted to float
  std::int64_t numel() const {
    std::int64_t n = 1;
    for (auto d : shape) n *= d;
    return n;
  }
};

namespace detail {
inline std::string shape_str(const std::vector<std::int64_t>& s) {
  std::string r = "[";
  for (std::size_t i = 0; i < s.size(); ++i) r += (i ? ", " : "") + std::to_string(s[i]);
  return r + "]";
}
// Value of key `key` in the header dict text: the characters up to the next ',' at depth 0 or '}'.
inline std::string npy_field(const std::string& h, const std::string& key, const std::string& file) {
  for (const char* q : {"'", "\""}) {
    const std::string k = q + key + q;
    auto p = h.find(k);
    if (p == std::string::npos) continue;
    p = h.find(':', p + k.size());
    if (p == std::string::npos) break;
    ++p;
    int depth = 0;
    std::size_t e = p;
    for (; e < h.size(); ++e) {
      const char c = h[e];
      if (c == '(' || c == '[') ++depth;
      else if (c == ')' || c == ']') --depth;
      else if ((c == ',' || c == '}') && depth == 0) break;
    }
    std::string v = h.substr(p, e - p);
    const auto b = v.find_first_not_of(" \t"), f = v.find_last_not_of(" \t");
    return b == std::string::npos ? std::string() : v.substr(b, f - b + 1);
  }
  throw io_error("read_npy: " + file + ": the header has no '" + key + "' entry");
}
}  // namespace detail

/// Parses .npy bytes (`file` names them in errors).
inline npy_array parse_npy(const std::string& bytes, const std::string& file) {
  auto fail = [&](const std::string& what) { throw io_error("read_npy: " + file + ": " + what); };
  if (bytes.size() < 10 || std::memcmp(bytes.data(), "\x93NUMPY", 6) != 0) fail("not a .npy file (bad magic string)");
  const unsigned major = static_cast<unsigned char>(bytes[6]);
  if (major < 1 || major > 3) fail("unsupported .npy version " + std::to_string(major));
  std::size_t hlen = 0, hstart = 0;
  if (major == 1) {
    hlen = static_cast<unsigned char>(bytes[8]) | (static_cast<std::size_t>(static_cast<unsigned char>(bytes[9])) << 8);
    hstart = 10;
  } else {
    if (bytes.size() < 12) fail("file too short for a version " + std::to_string(major) + " header");
    for (int i = 0; i < 4; ++i) hlen |= static_cast<std::size_t>(static_cast<unsigned char>(bytes[8 + i])) << (8 * i);
    hstart = 12;
  }
  if (hlen > bytes.size() - hstart) fail("header length " + std::to_string(hlen) + " runs past the end of the file");
  const std::string h = bytes.substr(hstart, hlen);
  const std::string descr = detail::npy_field(h, "descr", file);
  const std::string fortran = detail::npy_field(h, "fortran_order", file);
  std::string shape_txt = detail::npy_field(h, "shape", file);
  if (fortran != "False") fail("Fortran-ordered arrays are not supported (fortran_order " + fortran + ")");
  std::size_t esize = 0;
  int kind = 0;  // 1 f4, 2 f8, 3 u1
  if (descr == "'<f4'" || descr == "\"<f4\"") esize = 4, kind = 1;
  else if (descr == "'<f8'" || descr == "\"<f8\"") esize = 8, kind = 2;
  else if (descr == "'|u1'" || descr == "\"|u1\"" || descr == "'<u1'") esize = 1, kind = 3;
  else fail("unsupported dtype " + descr + " (expected float32 '<f4', float64 '<f8' or uint8 '|u1')");
  if (shape_txt.size() < 2 || shape_txt.front() != '(' || shape_txt.back() != ')') fail("malformed shape " + shape_txt);
  npy_array a;
  std::string num;
  for (std::size_t i = 1; i < shape_txt.size(); ++i) {
    const char c = shape_txt[i];
    if (c >= '0' && c <= '9') num += c;
    else if (c == ',' || c == ')') {
      if (!num.empty()) {
        if (num.size() > 15) fail("dimension " + num + " too large");
        a.shape.push_back(std::stoll(num));
        num.clear();
      }
    } else if (c != ' ' && c != 'L') fail("malformed shape " + shape_txt);
  }
  const std::int64_t n = a.numel();
  const std::size_t dstart = hstart + hlen;
  if (n < 0 || static_cast<std::size_t>(n) > (bytes.size() - dstart) / esize || bytes.size() - dstart != std::size_t(n) * esize)
    fail("data size " + std::to_string(bytes.size() - dstart) + " bytes does not match shape " + detail::shape_str(a.shape) +
         " of " + std::to_string(esize) + "-byte elements");
  a.data.resize(static_cast<std::size_t>(n));
  const char* d = bytes.data() + dstart;
  for (std::int64_t i = 0; i < n; ++i) {
    if (kind == 1) {
      float v;
      std::memcpy(&v, d + 4 * i, 4);
      a.data[std::size_t(i)] = v;
    } else if (kind == 2) {
      double v;
      std::memcpy(&v, d + 8 * i, 8);
      a.data[std::size_t(i)] = float(v);
    } else {
      a.data[std::size_t(i)] = float(static_cast<unsigned char>(d[i]));
    }
  }
  return a;
}

inline npy_array read_npy(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw io_error("read_npy: " + path + ": cannot open the file");
  std::string bytes((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  if (f.bad()) throw io_error("read_npy: " + path + ": read error");
  return parse_npy(bytes, path);
}

/// Writes float32 data of the given shape as .npy (version 1.0), atomically.
inline void write_npy(const std::string& path, const std::vector<std::int64_t>& shape, const float* data) {
  std::int64_t n = 1;
  for (auto d : shape) n *= d;
  std::string dict = "{'descr': '<f4', 'fortran_order': False, 'shape': (";
  for (std::size_t i = 0; i < shape.size(); ++i) dict += std::to_string(shape[i]) + (shape.size() == 1 || i + 1 < shape.size() ? "," : "");
  dict += "), }";
  std::size_t total = 10 + dict.size() + 1;
  const std::size_t pad = (64 - total % 64) % 64;
  dict += std::string(pad, ' ') + "\n";
  std::string out = "\x93NUMPY";
  out += char(1);
  out += char(0);
  out += char(dict.size() & 0xff);
  out += char((dict.size() >> 8) & 0xff);
  out += dict;
  out.append(reinterpret_cast<const char*>(data), static_cast<std::size_t>(n) * 4);
  write_file_atomic(path, std::span<const std::byte>(reinterpret_cast<const std::byte*>(out.data()), out.size()));
}

}  // namespace dino::io
