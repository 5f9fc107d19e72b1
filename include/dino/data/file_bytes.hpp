// dino/data/file_bytes.hpp: whole files as bytes, gzip or not.
//
//   read_file_bytes(path)      the file's bytes; io_error if it is missing, not a regular
//                              file, or cannot be read in full
//   gunzip(bytes, name)        inflates a gzip stream (RFC 1952; several members are
//                              concatenated, as gzip -d does) with zlib; io_error naming
//                              `name` on a corrupt stream (bad header, data or CRC) or a
//                              truncated one, never a partial result
//   read_maybe_gzip(path)      read_file_bytes, then gunzip when the file starts with the
//                              gzip magic 1f 8b
// Needs zlib (ZLIB::ZLIB, which dino::dino links).
#pragma once

#include <zlib.h>

#include <algorithm>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <string>
#include <system_error>
#include <vector>

#include "dino/core/error.hpp"

namespace dino::data {

inline std::vector<std::uint8_t> read_file_bytes(const std::filesystem::path& path) {
  std::error_code ec;
  const auto st = std::filesystem::status(path, ec);
  require<io_error>(std::filesystem::exists(st), path.string(), ": no such file");
  require<io_error>(std::filesystem::is_regular_file(st), path.string(), ": not a regular file");
  std::ifstream f(path, std::ios::binary);
  require<io_error>(f.is_open(), path.string(), ": cannot open for reading");
  f.seekg(0, std::ios::end);
  const std::streamoff n = f.tellg();
  require<io_error>(n >= 0, path.string(), ": cannot determine the file size");
  f.seekg(0, std::ios::beg);
  std::vector<std::uint8_t> bytes(static_cast<std::size_t>(n));
  if (n > 0) f.read(reinterpret_cast<char*>(bytes.data()), n);
  require<io_error>(n == 0 || (f && f.gcount() == n), path.string(), ": read ", f.gcount(), " of ", n, " bytes");
  return bytes;
}

inline bool is_gzip(const std::vector<std::uint8_t>& bytes) {
  return bytes.size() >= 2 && bytes[0] == 0x1f && bytes[1] == 0x8b;
}

inline std::vector<std::uint8_t> gunzip(const std::vector<std::uint8_t>& in, const std::string& name) {
  z_stream s{};
  require<io_error>(inflateInit2(&s, 15 + 16) == Z_OK, name, ": zlib inflateInit2 failed");
  struct guard {
    z_stream* s;
    ~guard() { inflateEnd(s); }
  } g{&s};

  // The trailer's ISIZE (size mod 2^32 of the last member) is only a hint: a deflate stream
  // expands at most ~1032:1, so a lying trailer cannot make us reserve absurd memory.
  std::size_t hint = 0;
  if (in.size() >= 18) {
    const std::uint8_t* t = in.data() + in.size() - 4;
    hint = std::size_t(t[0]) | std::size_t(t[1]) << 8 | std::size_t(t[2]) << 16 | std::size_t(t[3]) << 24;
  }
  hint = std::min(hint, in.size() * 1032);
  std::vector<std::uint8_t> out(std::max<std::size_t>(hint, 1 << 16));
  std::size_t produced = 0, fed = 0;
  constexpr std::size_t chunk = std::size_t(1) << 30;  // uInt is 32 bits
  for (;;) {
    if (s.avail_in == 0 && fed < in.size()) {
      const std::size_t c = std::min(chunk, in.size() - fed);
      s.next_in = const_cast<Bytef*>(in.data() + fed);
      s.avail_in = static_cast<uInt>(c);
      fed += c;
    }
    if (produced == out.size()) out.resize(out.size() * 2);
    const std::size_t room = std::min(chunk, out.size() - produced);
    s.next_out = out.data() + produced;
    s.avail_out = static_cast<uInt>(room);
    const int r = inflate(&s, Z_NO_FLUSH);
    produced += room - s.avail_out;
    if (r == Z_STREAM_END) {
      if (s.avail_in == 0 && fed == in.size()) break;
      // Another gzip member follows (as `cat a.gz b.gz` makes); anything else is garbage.
      const std::uint8_t* next = s.next_in;
      const std::size_t left = s.avail_in;
      require<io_error>(left >= 2 && next[0] == 0x1f && next[1] == 0x8b, name,
                        ": unexpected bytes after the end of the gzip stream");
      require<io_error>(inflateReset(&s) == Z_OK, name, ": zlib inflateReset failed");
      continue;
    }
    if (r == Z_OK) continue;
    if (r == Z_BUF_ERROR && !(s.avail_in == 0 && fed == in.size())) continue;
    if (r == Z_BUF_ERROR) throw io_error(dino::detail::concat(name, ": truncated gzip stream (ends after ", in.size(),
                                                        " compressed bytes, ", produced, " bytes inflated)"));
    throw io_error(dino::detail::concat(name, ": corrupt gzip stream (zlib: ", s.msg ? s.msg : "error ", s.msg ? "" : std::to_string(r),
                                  ")"));
  }
  out.resize(produced);
  return out;
}

inline std::vector<std::uint8_t> read_maybe_gzip(const std::filesystem::path& path) {
  auto bytes = read_file_bytes(path);
  if (is_gzip(bytes)) return gunzip(bytes, path.string());
  return bytes;
}

}  // namespace dino::data
