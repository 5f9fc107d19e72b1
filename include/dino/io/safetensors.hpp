// dino/io/safetensors.hpp: read and write safetensors files, trusting nothing in them.
//
// The format (Hugging Face safetensors): an 8-byte little-endian length N, N bytes of UTF-8
// JSON
//   {"<name>": {"dtype": "F32", "shape": [d0, ...], "data_offsets": [begin, end]}, ...,
//    "__metadata__": {"<key>": "<value>", ...}}                       (metadata optional)
// padded with spaces, then the data buffer. Offsets are bytes from the start of the data
// buffer, values are little-endian and row-major.
//
// Reading: safetensors_file::read(path) loads the whole file into memory; parse(bytes) takes
// bytes already in memory. Before anything is used every part is checked: the file holds the
// 8-byte length, N <= 100 MB and fits in the file, the header is valid JSON of exactly the
// shape above (a parser for this subset only: objects, strings with escapes and \uXXXX,
// arrays of non-negative integers, no floats or nesting elsewhere; strings must be UTF-8),
// names are unique, dtypes are known, end - begin == numel * dtype size, offsets lie inside
// the data buffer and tensors do not overlap. Any failure throws io_error "safetensors:
// <file>: <what was wrong>". Every safetensors dtype of whole bytes is recognised, so a file
// with integer tensors (BatchNorm's num_batches_tracked) still opens; to_float() converts
// F32, F16, BF16 and F64 and refuses the others.
//
// Writing: write_safetensors() writes F32, or BF16 rounded to nearest even, atomically
// (io/atomic_file.hpp) and streams the values, so it never holds a second copy of a model;
// encode_safetensors() builds the same bytes in memory. The header is padded to 8 bytes so
// that the data is aligned.
#pragma once

#include <algorithm>
#include <bit>
#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <map>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include "dino/core/error.hpp"
#include "dino/io/atomic_file.hpp"

namespace dino::io {

/// The safetensors dtypes of whole bytes.
enum class st_dtype : std::uint8_t { boolean, u8, i8, f8_e5m2, f8_e4m3, i16, u16, f16, bf16, i32, u32, f32, i64, u64, f64 };

namespace detail {
struct dtype_row {
  st_dtype code;
  const char* name;
  std::size_t size;
};
inline constexpr dtype_row dtype_table[] = {
    {st_dtype::boolean, "BOOL", 1}, {st_dtype::u8, "U8", 1},    {st_dtype::i8, "I8", 1},
    {st_dtype::f8_e5m2, "F8_E5M2", 1}, {st_dtype::f8_e4m3, "F8_E4M3", 1}, {st_dtype::i16, "I16", 2},
    {st_dtype::u16, "U16", 2},      {st_dtype::f16, "F16", 2},  {st_dtype::bf16, "BF16", 2},
    {st_dtype::i32, "I32", 4},      {st_dtype::u32, "U32", 4},  {st_dtype::f32, "F32", 4},
    {st_dtype::i64, "I64", 8},      {st_dtype::u64, "U64", 8},  {st_dtype::f64, "F64", 8},
};
}  // namespace detail

inline const char* dtype_name(st_dtype d) { return detail::dtype_table[static_cast<std::size_t>(d)].name; }
inline std::size_t dtype_size(st_dtype d) { return detail::dtype_table[static_cast<std::size_t>(d)].size; }
inline std::optional<st_dtype> parse_dtype(std::string_view s) {
  for (const auto& r : detail::dtype_table)
    if (s == r.name) return r.code;
  return std::nullopt;
}
/// Whether to_float() converts this dtype.
inline bool is_float_dtype(st_dtype d) {
  return d == st_dtype::f32 || d == st_dtype::f16 || d == st_dtype::bf16 || d == st_dtype::f64;
}

// ------------------------------------------------------------------ number conversions

/// IEEE binary16 to float, exactly (subnormals, infinities and NaN included).
inline float half_to_float(std::uint16_t h) {
  const std::uint32_t sign = static_cast<std::uint32_t>(h & 0x8000u) << 16;
  const std::uint32_t exp = (h >> 10) & 0x1fu, mant = h & 0x3ffu;
  if (exp == 0) {
    float v = static_cast<float>(mant) * 5.9604644775390625e-8f;  // mant * 2^-24
    return sign ? -v : v;
  }
  std::uint32_t bits = exp == 31 ? (sign | 0x7f800000u | (mant << 13)) : (sign | ((exp + 112u) << 23) | (mant << 13));
  return std::bit_cast<float>(bits);
}
inline float bf16_to_float(std::uint16_t b) { return std::bit_cast<float>(static_cast<std::uint32_t>(b) << 16); }
/// float to bfloat16, rounding to nearest even; NaN stays a (quiet) NaN.
inline std::uint16_t float_to_bf16(float f) {
  std::uint32_t u = std::bit_cast<std::uint32_t>(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<std::uint16_t>((u >> 16) | 0x40u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<std::uint16_t>(u >> 16);
}

namespace detail {
inline std::uint64_t load_le(const std::byte* p, std::size_t n) {
  std::uint64_t v = 0;
  for (std::size_t i = 0; i < n; ++i) v |= static_cast<std::uint64_t>(p[i]) << (8 * i);
  return v;
}
inline void store_le(std::byte* p, std::uint64_t v, std::size_t n) {
  for (std::size_t i = 0; i < n; ++i) p[i] = static_cast<std::byte>((v >> (8 * i)) & 0xffu);
}
}  // namespace detail

// ------------------------------------------------------------------ header parser

using metadata_map = std::map<std::string, std::string>;

/// One tensor of a file, as its header describes it (already checked against the file).
struct tensor_info {
  std::string name;
  st_dtype dtype = st_dtype::f32;
  std::vector<std::int64_t> shape;
  std::uint64_t begin = 0, end = 0;  ///< bytes from the start of the data buffer

  std::int64_t numel() const {
    std::int64_t n = 1;
    for (auto d : shape) n *= d;
    return n;
  }
  std::uint64_t nbytes() const { return end - begin; }
  std::string shape_str() const {
    std::string s = "[";
    for (std::size_t i = 0; i < shape.size(); ++i) {
      if (i) s += ", ";
      s += std::to_string(shape[i]);
    }
    return s + "]";
  }
};

namespace detail {

// The length of the well-formed UTF-8 sequence of a non-ASCII lead byte at s[pos], or 0 when
// it is malformed, truncated, overlong, a surrogate or beyond U+10FFFF.
inline std::size_t utf8_length(std::string_view s, std::size_t pos) {
  auto b0 = static_cast<unsigned char>(s[pos]);
  if (b0 < 0xc2 || b0 > 0xf4) return 0;
  std::size_t len = b0 >= 0xf0 ? 4 : b0 >= 0xe0 ? 3 : 2;
  if (s.size() - pos < len) return 0;
  std::uint32_t cp = b0 & (0xffu >> (len + 1));
  for (std::size_t i = 1; i < len; ++i) {
    auto b = static_cast<unsigned char>(s[pos + i]);
    if ((b & 0xc0) != 0x80) return 0;
    cp = (cp << 6) | (b & 0x3fu);
  }
  if ((len == 3 && cp < 0x800) || (len == 4 && (cp < 0x10000 || cp > 0x10ffff)) || (cp >= 0xd800 && cp <= 0xdfff))
    return 0;
  return len;
}
inline bool utf8_valid(std::string_view s) {
  for (std::size_t i = 0; i < s.size();) {
    if (static_cast<unsigned char>(s[i]) < 0x80) {
      ++i;
    } else {
      std::size_t n = utf8_length(s, i);
      if (n == 0) return false;
      i += n;
    }
  }
  return true;
}

// A recursive-descent parser for exactly the safetensors header: no recursion deeper than
// three levels, every read bounds-checked, every failure an io_error with the byte position.
class header_parser {
 public:
  header_parser(std::string_view text, const std::string& file) : s_(text), file_(file) {}

  void run(std::vector<tensor_info>& tensors, metadata_map& metadata) {
    bool have_metadata = false;
    ws();
    expect('{', "expected '{' at the start of the header");
    ws();
    if (peek() == '}') {
      ++pos_;
    } else {
      for (;;) {
        ws();
        std::size_t key_pos = pos_;
        std::string key = string();
        ws();
        expect(':', "expected ':' after a key");
        ws();
        if (key == "__metadata__") {
          if (have_metadata) fail_at(key_pos, "\"__metadata__\" appears twice");
          have_metadata = true;
          parse_metadata(metadata);
        } else {
          tensors.push_back(parse_tensor(std::move(key), key_pos));
        }
        ws();
        char c = next("expected ',' or '}' after a value");
        if (c == '}') break;
        if (c != ',') fail_at(pos_ - 1, "expected ',' or '}' after a value");
      }
    }
    ws();
    if (pos_ != s_.size()) fail("unexpected characters after the JSON object");
  }

 private:
  [[noreturn]] void fail_at(std::size_t pos, const std::string& what) const {
    throw io_error(concat("safetensors: ", file_, ": invalid JSON header at byte ", pos, " of ", s_.size(), ": ",
                          what));
  }
  [[noreturn]] void fail(const std::string& what) const { fail_at(pos_, what); }
  [[noreturn]] void bad_tensor(const std::string& name, const std::string& what) const {
    throw io_error(concat("safetensors: ", file_, ": tensor '", name, "': ", what));
  }

  int peek() const { return pos_ < s_.size() ? static_cast<unsigned char>(s_[pos_]) : -1; }
  char next(const char* what_if_end) {
    if (pos_ >= s_.size()) fail(std::string("unexpected end of the header: ") + what_if_end);
    return s_[pos_++];
  }
  void expect(char c, const char* what) {
    if (peek() != static_cast<unsigned char>(c)) fail(peek() < 0 ? std::string("unexpected end of the header: ") + what : what);
    ++pos_;
  }
  void ws() {
    while (pos_ < s_.size() && (s_[pos_] == ' ' || s_[pos_] == '\t' || s_[pos_] == '\n' || s_[pos_] == '\r')) ++pos_;
  }

  static void put_utf8(std::string& out, std::uint32_t cp) {
    if (cp < 0x80) {
      out += static_cast<char>(cp);
    } else if (cp < 0x800) {
      out += static_cast<char>(0xc0 | (cp >> 6));
      out += static_cast<char>(0x80 | (cp & 0x3f));
    } else if (cp < 0x10000) {
      out += static_cast<char>(0xe0 | (cp >> 12));
      out += static_cast<char>(0x80 | ((cp >> 6) & 0x3f));
      out += static_cast<char>(0x80 | (cp & 0x3f));
    } else {
      out += static_cast<char>(0xf0 | (cp >> 18));
      out += static_cast<char>(0x80 | ((cp >> 12) & 0x3f));
      out += static_cast<char>(0x80 | ((cp >> 6) & 0x3f));
      out += static_cast<char>(0x80 | (cp & 0x3f));
    }
  }
  std::uint32_t hex4() {
    std::uint32_t v = 0;
    for (int i = 0; i < 4; ++i) {
      char c = next("inside a \\u escape");
      int d = (c >= '0' && c <= '9') ? c - '0' : (c >= 'a' && c <= 'f') ? c - 'a' + 10 : (c >= 'A' && c <= 'F') ? c - 'A' + 10 : -1;
      if (d < 0) fail_at(pos_ - 1, "invalid hexadecimal digit in a \\u escape");
      v = v * 16 + static_cast<std::uint32_t>(d);
    }
    return v;
  }
  void utf8_sequence(std::string& out) {
    std::size_t len = utf8_length(s_, pos_);
    if (len == 0) fail("invalid UTF-8 in a string");
    out.append(s_.substr(pos_, len));
    pos_ += len;
  }
  std::string string() {
    if (peek() != '"') fail(peek() < 0 ? "unexpected end of the header: expected a string" : "expected a string");
    ++pos_;
    std::string out;
    for (;;) {
      if (pos_ >= s_.size()) fail("unexpected end of the header inside a string");
      auto c = static_cast<unsigned char>(s_[pos_]);
      if (c == '"') {
        ++pos_;
        return out;
      }
      if (c < 0x20) fail("control character inside a string");
      if (c >= 0x80) {
        utf8_sequence(out);
        continue;
      }
      ++pos_;
      if (c != '\\') {
        out += static_cast<char>(c);
        continue;
      }
      std::size_t esc = pos_ - 1;
      switch (next("inside an escape")) {
        case '"': out += '"'; break;
        case '\\': out += '\\'; break;
        case '/': out += '/'; break;
        case 'b': out += '\b'; break;
        case 'f': out += '\f'; break;
        case 'n': out += '\n'; break;
        case 'r': out += '\r'; break;
        case 't': out += '\t'; break;
        case 'u': {
          std::uint32_t cp = hex4();
          if (cp >= 0xdc00 && cp <= 0xdfff) fail_at(esc, "unpaired low surrogate in a \\u escape");
          if (cp >= 0xd800 && cp <= 0xdbff) {
            if (next("after a high surrogate") != '\\' || next("after a high surrogate") != 'u')
              fail_at(esc, "high surrogate not followed by a low surrogate");
            std::uint32_t lo = hex4();
            if (lo < 0xdc00 || lo > 0xdfff) fail_at(esc, "high surrogate not followed by a low surrogate");
            cp = 0x10000 + ((cp - 0xd800) << 10) + (lo - 0xdc00);
          }
          put_utf8(out, cp);
          break;
        }
        default: fail_at(esc, "invalid escape in a string");
      }
    }
  }
  std::uint64_t integer() {
    std::size_t start = pos_;
    if (peek() == '-') fail("negative number where a size or offset was expected");
    if (peek() < '0' || peek() > '9') fail(peek() < 0 ? "unexpected end of the header: expected an integer" : "expected a non-negative integer");
    if (peek() == '0' && pos_ + 1 < s_.size() && s_[pos_ + 1] >= '0' && s_[pos_ + 1] <= '9')
      fail("number with a leading zero");
    std::uint64_t v = 0;
    while (peek() >= '0' && peek() <= '9') {
      auto d = static_cast<std::uint64_t>(s_[pos_] - '0');
      if (v > (static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max()) - d) / 10)
        fail_at(start, "integer too large");
      v = v * 10 + d;
      ++pos_;
    }
    if (peek() == '.' || peek() == 'e' || peek() == 'E') fail("expected an integer, found a fraction or exponent");
    return v;
  }
  std::vector<std::uint64_t> int_array() {
    expect('[', "expected '['");
    std::vector<std::uint64_t> v;
    ws();
    if (peek() == ']') {
      ++pos_;
      return v;
    }
    for (;;) {
      ws();
      v.push_back(integer());
      ws();
      char c = next("expected ',' or ']' in an array");
      if (c == ']') return v;
      if (c != ',') fail_at(pos_ - 1, "expected ',' or ']' in an array");
    }
  }
  tensor_info parse_tensor(std::string name, std::size_t key_pos) {
    tensor_info t;
    t.name = std::move(name);
    bool have_dtype = false, have_shape = false, have_offsets = false;
    expect('{', "expected '{' to open a tensor entry");
    ws();
    if (peek() == '}') fail("empty tensor entry");
    for (;;) {
      ws();
      std::size_t kpos = pos_;
      std::string key = string();
      ws();
      expect(':', "expected ':' after a key");
      ws();
      if (key == "dtype") {
        if (have_dtype) fail_at(kpos, "\"dtype\" appears twice in a tensor entry");
        std::string d = string();
        auto code = parse_dtype(d);
        if (!code) bad_tensor(t.name, "unknown dtype '" + d + "' (known: BOOL, U8, I8, F8_E5M2, F8_E4M3, I16, U16, F16, BF16, I32, U32, F32, I64, U64, F64)");
        t.dtype = *code;
        have_dtype = true;
      } else if (key == "shape") {
        if (have_shape) fail_at(kpos, "\"shape\" appears twice in a tensor entry");
        for (auto d : int_array()) t.shape.push_back(static_cast<std::int64_t>(d));
        have_shape = true;
      } else if (key == "data_offsets") {
        if (have_offsets) fail_at(kpos, "\"data_offsets\" appears twice in a tensor entry");
        auto o = int_array();
        if (o.size() != 2) bad_tensor(t.name, concat("data_offsets must hold 2 integers, found ", o.size()));
        t.begin = o[0];
        t.end = o[1];
        have_offsets = true;
      } else {
        fail_at(kpos, "unexpected key '" + key + "' in a tensor entry (expected dtype, shape, data_offsets)");
      }
      ws();
      char c = next("expected ',' or '}' in a tensor entry");
      if (c == '}') break;
      if (c != ',') fail_at(pos_ - 1, "expected ',' or '}' in a tensor entry");
    }
    if (!have_dtype || !have_shape || !have_offsets)
      bad_tensor(t.name, concat("entry at byte ", key_pos, " lacks ", !have_dtype ? "\"dtype\"" : !have_shape ? "\"shape\"" : "\"data_offsets\""));
    return t;
  }
  void parse_metadata(metadata_map& m) {
    expect('{', "expected '{' to open \"__metadata__\"");
    ws();
    if (peek() == '}') {
      ++pos_;
      return;
    }
    for (;;) {
      ws();
      std::size_t kpos = pos_;
      std::string key = string();
      ws();
      expect(':', "expected ':' after a key");
      ws();
      if (peek() != '"') fail("metadata value for '" + key + "' must be a string");
      std::string value = string();
      if (!m.emplace(std::move(key), std::move(value)).second) fail_at(kpos, "metadata key appears twice");
      ws();
      char c = next("expected ',' or '}' in \"__metadata__\"");
      if (c == '}') return;
      if (c != ',') fail_at(pos_ - 1, "expected ',' or '}' in \"__metadata__\"");
    }
  }
  template <class... P>
  static std::string concat(P&&... p) {
    return dino::detail::concat(std::forward<P>(p)...);
  }

  std::string_view s_;
  const std::string& file_;
  std::size_t pos_ = 0;
};

// Bytes for numel elements of dtype d, or nullopt on overflow.
inline std::optional<std::uint64_t> tensor_bytes(const std::vector<std::int64_t>& shape, st_dtype d) {
  std::uint64_t n = dtype_size(d);
  for (auto x : shape) {
    auto u = static_cast<std::uint64_t>(x);
    if (u != 0 && n > std::numeric_limits<std::uint64_t>::max() / u) return std::nullopt;
    n *= u;
  }
  return n;
}

}  // namespace detail

// ------------------------------------------------------------------ reader

class safetensors_file {
 public:
  /// The largest header accepted (the reference implementation's limit).
  static constexpr std::uint64_t max_header_bytes = 100'000'000;

  /// Reads and checks a whole file.
  static safetensors_file read(const std::string& path) {
    int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) throw io_error("safetensors: cannot open '" + path + "': " + std::strerror(errno));
    struct closer {
      int fd;
      ~closer() { ::close(fd); }
    } guard{fd};
    struct stat st {};
    if (::fstat(fd, &st) != 0) throw io_error("safetensors: cannot stat '" + path + "': " + std::strerror(errno));
    if (!S_ISREG(st.st_mode)) throw io_error("safetensors: '" + path + "' is not a regular file");
    std::vector<std::byte> bytes(static_cast<std::size_t>(st.st_size));
    std::size_t got = 0;
    while (got < bytes.size()) {
      ::ssize_t r = ::read(fd, bytes.data() + got, bytes.size() - got);
      if (r < 0 && errno == EINTR) continue;
      if (r < 0) throw io_error("safetensors: cannot read '" + path + "': " + std::strerror(errno));
      if (r == 0) throw io_error("safetensors: '" + path + "' shrank while it was read");
      got += static_cast<std::size_t>(r);
    }
    return from_bytes(std::move(bytes), path);
  }

  /// Checks bytes already in memory (copied); name_for_errors appears in every message.
  static safetensors_file parse(std::span<const std::byte> bytes, const std::string& name_for_errors) {
    return from_bytes(std::vector<std::byte>(bytes.begin(), bytes.end()), name_for_errors);
  }

  const std::string& name() const { return name_; }
  const std::vector<tensor_info>& tensors() const { return tensors_; }
  const metadata_map& metadata() const { return metadata_; }

  const tensor_info* find(std::string_view n) const {
    auto it = std::lower_bound(by_name_.begin(), by_name_.end(), n,
                               [&](std::size_t i, std::string_view k) { return tensors_[i].name < k; });
    return it != by_name_.end() && tensors_[*it].name == n ? &tensors_[*it] : nullptr;
  }
  const tensor_info& at(std::string_view n) const {
    const tensor_info* t = find(n);
    if (!t) throw io_error("safetensors: " + name_ + ": no tensor named '" + std::string(n) + "'");
    return *t;
  }

  /// The raw little-endian bytes of a tensor.
  std::span<const std::byte> raw(const tensor_info& t) const {
    check_info(t);
    return {bytes_.data() + data_start_ + t.begin, static_cast<std::size_t>(t.nbytes())};
  }

  /// Converts a tensor of dtype F32, F16, BF16 or F64 to numel() floats at out.
  void to_float(const tensor_info& t, float* out) const {
    check_info(t);
    if (!is_float_dtype(t.dtype))
      throw io_error("safetensors: " + name_ + ": tensor '" + t.name + "' has dtype " + dtype_name(t.dtype) +
                     ", which does not convert to float (F32, F16, BF16 or F64)");
    const std::byte* p = bytes_.data() + data_start_ + t.begin;
    const auto n = static_cast<std::size_t>(t.numel());
    switch (t.dtype) {
      case st_dtype::f32:
        if constexpr (std::endian::native == std::endian::little) {
          if (n) std::memcpy(out, p, n * 4);
        } else {
          for (std::size_t i = 0; i < n; ++i)
            out[i] = std::bit_cast<float>(static_cast<std::uint32_t>(detail::load_le(p + 4 * i, 4)));
        }
        break;
      case st_dtype::f16:
        for (std::size_t i = 0; i < n; ++i) out[i] = half_to_float(static_cast<std::uint16_t>(detail::load_le(p + 2 * i, 2)));
        break;
      case st_dtype::bf16:
        for (std::size_t i = 0; i < n; ++i) out[i] = bf16_to_float(static_cast<std::uint16_t>(detail::load_le(p + 2 * i, 2)));
        break;
      default: {  // f64: out-of-range values become infinities explicitly (no undefined conversion)
        for (std::size_t i = 0; i < n; ++i) {
          double d = std::bit_cast<double>(detail::load_le(p + 8 * i, 8));
          constexpr double fmax = std::numeric_limits<float>::max();
          out[i] = d > fmax ? std::numeric_limits<float>::infinity()
                   : d < -fmax ? -std::numeric_limits<float>::infinity()
                               : static_cast<float>(d);
        }
      }
    }
  }
  /// As above, checking that out holds exactly numel() floats.
  void to_float(const tensor_info& t, std::span<float> out) const {
    check_info(t);
    if (out.size() != static_cast<std::size_t>(t.numel()))
      throw io_error(dino::detail::concat("safetensors: ", name_, ": tensor '", t.name, "' has ", t.numel(),
                                          " elements, the output holds ", out.size()));
    to_float(t, out.data());
  }
  std::vector<float> to_float(const tensor_info& t) const {
    check_info(t);
    std::vector<float> v(static_cast<std::size_t>(t.numel()));
    to_float(t, v.data());
    return v;
  }

 private:
  [[noreturn]] static void fail(const std::string& file, const std::string& what) {
    throw io_error("safetensors: " + file + ": " + what);
  }
  // Guards against a tensor_info that does not come from this file (or was edited).
  void check_info(const tensor_info& t) const {
    auto need = detail::tensor_bytes(t.shape, t.dtype);
    if (t.begin > t.end || t.end > bytes_.size() - data_start_ || !need || *need != t.nbytes())
      fail(name_, "tensor_info '" + t.name + "' does not describe this file's data");
  }

  static safetensors_file from_bytes(std::vector<std::byte> bytes, const std::string& file) {
    using dino::detail::concat;
    if (bytes.size() < 8)
      fail(file, concat("file too short (", bytes.size(), " bytes): a safetensors file starts with an 8-byte header length"));
    const std::uint64_t n = detail::load_le(bytes.data(), 8);
    if (n > max_header_bytes) fail(file, concat("header length ", n, " is absurd (more than ", max_header_bytes, " bytes)"));
    if (n > bytes.size() - 8)
      fail(file, concat("header length ", n, " is larger than the file (", bytes.size(), " bytes, ", n + 8,
                        " needed): truncated file?"));

    safetensors_file f;
    f.name_ = file;
    f.data_start_ = static_cast<std::size_t>(8 + n);
    std::string_view text(reinterpret_cast<const char*>(bytes.data() + 8), static_cast<std::size_t>(n));
    detail::header_parser(text, file).run(f.tensors_, f.metadata_);
    const std::uint64_t data_size = bytes.size() - f.data_start_;

    for (const auto& t : f.tensors_) {
      std::string where = "tensor '" + t.name + "': ";
      std::string offs = concat("data_offsets [", t.begin, ", ", t.end, "]");
      if (t.begin > t.end) fail(file, where + offs + " are reversed");
      if (t.end > data_size)
        fail(file, concat(where, offs, " lie outside the data buffer (", data_size, " bytes): truncated file?"));
      auto need = detail::tensor_bytes(t.shape, t.dtype);
      if (!need) fail(file, concat(where, "shape ", t.shape_str(), " is too large"));
      if (*need != t.nbytes())
        fail(file, concat(where, "shape ", t.shape_str(), " of ", dtype_name(t.dtype), " needs ", *need, " bytes but ",
                          offs, " hold ", t.nbytes()));
    }

    f.by_name_.resize(f.tensors_.size());
    for (std::size_t i = 0; i < f.by_name_.size(); ++i) f.by_name_[i] = i;
    std::sort(f.by_name_.begin(), f.by_name_.end(),
              [&](std::size_t a, std::size_t b) { return f.tensors_[a].name < f.tensors_[b].name; });
    for (std::size_t i = 1; i < f.by_name_.size(); ++i)
      if (f.tensors_[f.by_name_[i]].name == f.tensors_[f.by_name_[i - 1]].name)
        fail(file, "duplicate tensor name '" + f.tensors_[f.by_name_[i]].name + "' (it appears twice in the header)");

    // Empty tensors occupy no bytes and cannot overlap anything.
    std::vector<const tensor_info*> by_offset;
    for (const auto& t : f.tensors_)
      if (t.nbytes()) by_offset.push_back(&t);
    std::sort(by_offset.begin(), by_offset.end(), [](const tensor_info* a, const tensor_info* b) { return a->begin < b->begin; });
    for (std::size_t i = 1; i < by_offset.size(); ++i) {
      const tensor_info &a = *by_offset[i - 1], &b = *by_offset[i];
      if (a.end > b.begin)
        fail(file, concat("tensors '", a.name, "' [", a.begin, ", ", a.end, ") and '", b.name, "' [", b.begin, ", ",
                          b.end, ") overlap"));
    }
    f.bytes_ = std::move(bytes);
    return f;
  }

  std::string name_;
  std::vector<std::byte> bytes_;
  std::size_t data_start_ = 0;
  std::vector<tensor_info> tensors_;
  std::vector<std::size_t> by_name_;
  metadata_map metadata_;
};

// ------------------------------------------------------------------ writer

/// One tensor to write: numel(shape) floats at data (row-major).
struct tensor_entry {
  std::string name;
  std::vector<std::int64_t> shape;
  const float* data = nullptr;
};

namespace detail {

inline void json_string(std::string& out, std::string_view s) {
  out += '"';
  for (char ch : s) {
    auto c = static_cast<unsigned char>(ch);
    if (c == '"' || c == '\\') {
      out += '\\';
      out += ch;
    } else if (c < 0x20) {
      static constexpr char hex[] = "0123456789abcdef";
      out += "\\u00";
      out += hex[c >> 4];
      out += hex[c & 15];
    } else {
      out += ch;
    }
  }
  out += '"';
}

// The header (length prefix included, padded to 8 bytes) for entries written as dtype.
inline std::string encode_header(std::span<const tensor_entry> entries, const metadata_map& metadata, st_dtype dtype,
                                 const std::string& file) {
  auto fail = [&](const std::string& what) { throw io_error("write_safetensors: " + file + ": " + what); };
  if (dtype != st_dtype::f32 && dtype != st_dtype::bf16)
    fail(std::string("can write F32 or BF16, not ") + dtype_name(dtype));
  // What is written must read back: names and metadata must be UTF-8, as the reader demands.
  auto check_text = [&](const std::string& s, const char* what) {
    if (!utf8_valid(s)) fail(std::string(what) + " is not valid UTF-8");
  };
  std::vector<std::string_view> names;
  std::string json = "{";
  if (!metadata.empty()) {
    json += "\"__metadata__\":{";
    bool first = true;
    for (const auto& [k, v] : metadata) {
      check_text(k, "a metadata key");
      check_text(v, "a metadata value");
      if (!first) json += ',';
      first = false;
      json_string(json, k);
      json += ':';
      json_string(json, v);
    }
    json += '}';
  }
  std::uint64_t offset = 0;
  for (const auto& e : entries) {
    if (e.name == "__metadata__") fail("'__metadata__' cannot name a tensor");
    check_text(e.name, "a tensor name");
    names.push_back(e.name);
    for (auto d : e.shape)
      if (d < 0) fail("tensor '" + e.name + "' has a negative extent");
    auto bytes = tensor_bytes(e.shape, dtype);
    if (!bytes || *bytes > (std::numeric_limits<std::uint64_t>::max() >> 1) - offset)
      fail("tensor '" + e.name + "' is too large");
    if (*bytes && !e.data) fail("tensor '" + e.name + "' has no data");
    if (json.size() > 1) json += ',';
    json_string(json, e.name);
    json += ":{\"dtype\":\"";
    json += dtype_name(dtype);
    json += "\",\"shape\":[";
    for (std::size_t i = 0; i < e.shape.size(); ++i) {
      if (i) json += ',';
      json += std::to_string(e.shape[i]);
    }
    json += "],\"data_offsets\":[";
    json += std::to_string(offset);
    json += ',';
    json += std::to_string(offset + *bytes);
    json += "]}";
    offset += *bytes;
  }
  json += '}';
  std::sort(names.begin(), names.end());
  for (std::size_t i = 1; i < names.size(); ++i)
    if (names[i] == names[i - 1]) fail("duplicate tensor name '" + std::string(names[i]) + "'");
  while ((8 + json.size()) % 8) json += ' ';
  std::string out(8, '\0');
  detail::store_le(reinterpret_cast<std::byte*>(out.data()), json.size(), 8);
  return out + json;
}

// Streams the values of every entry to sink(const std::byte*, size_t): F32 straight from the
// caller's memory on little-endian hosts, otherwise converted through a 1 MiB buffer.
template <class Sink>
void encode_data(std::span<const tensor_entry> entries, st_dtype dtype, Sink&& sink) {
  constexpr std::size_t chunk = std::size_t(1) << 18;
  const std::size_t w = dtype_size(dtype);
  std::vector<std::byte> buf;
  for (const auto& e : entries) {
    std::size_t n = 1;
    for (auto d : e.shape) n *= static_cast<std::size_t>(d);
    if (n == 0) continue;
    if (dtype == st_dtype::f32 && std::endian::native == std::endian::little) {
      sink(reinterpret_cast<const std::byte*>(e.data), n * 4);
      continue;
    }
    buf.resize(std::min(chunk, n) * w);
    for (std::size_t i = 0; i < n; i += chunk) {
      std::size_t m = std::min(chunk, n - i);
      for (std::size_t j = 0; j < m; ++j) {
        float v = e.data[i + j];
        if (dtype == st_dtype::bf16)
          store_le(buf.data() + 2 * j, float_to_bf16(v), 2);
        else
          store_le(buf.data() + 4 * j, std::bit_cast<std::uint32_t>(v), 4);
      }
      sink(buf.data(), m * w);
    }
  }
}

}  // namespace detail

/// The bytes of a safetensors file holding entries (as F32 or BF16) and metadata.
inline std::vector<std::byte> encode_safetensors(std::span<const tensor_entry> entries, const metadata_map& metadata = {},
                                                 st_dtype dtype = st_dtype::f32) {
  std::string header = detail::encode_header(entries, metadata, dtype, "<memory>");
  std::vector<std::byte> out(reinterpret_cast<const std::byte*>(header.data()),
                             reinterpret_cast<const std::byte*>(header.data()) + header.size());
  detail::encode_data(entries, dtype, [&](const std::byte* p, std::size_t n) { out.insert(out.end(), p, p + n); });
  return out;
}

/// Writes entries (as F32 or BF16) and metadata to path atomically: on any failure the old
/// file, if any, is left in place and no temporary file remains.
inline void write_safetensors(const std::string& path, std::span<const tensor_entry> entries,
                              const metadata_map& metadata = {}, st_dtype dtype = st_dtype::f32) {
  std::string header = detail::encode_header(entries, metadata, dtype, path);
  atomic_file f(path);
  f.write(header.data(), header.size());
  detail::encode_data(entries, dtype, [&](const std::byte* p, std::size_t n) { f.write(p, n); });
  f.commit();
}

}  // namespace dino::io
