// A fixed-corpus driver for the fuzz entry point, for CI without libFuzzer: a small valid
// file, every truncation of it, every single-byte mutation (several values per position),
// some hand-made edge cases, and every file in the directories given as arguments.
// It fails (non-zero exit, or a crash) when the entry point lets anything but a
// dino::error escape or a round-trip property breaks; it also checks that the unmodified
// file is accepted and the truncations are not.
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include <dino/core/error.hpp>
#include <dino/io/safetensors.hpp>

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size);

namespace {
std::size_t runs = 0;
void feed(const std::vector<std::uint8_t>& in) {
  LLVMFuzzerTestOneInput(in.data(), in.size());
  ++runs;
}
bool accepted(const std::vector<std::uint8_t>& in) {
  try {
    (void)dino::io::safetensors_file::parse(
        std::span<const std::byte>(reinterpret_cast<const std::byte*>(in.data()), in.size()), "smoke");
    return true;
  } catch (const dino::io_error&) {
    return false;
  }
}
std::vector<std::uint8_t> bytes_of(const std::vector<std::byte>& b) {
  std::vector<std::uint8_t> out(b.size());
  for (std::size_t i = 0; i < b.size(); ++i) out[i] = static_cast<std::uint8_t>(b[i]);
  return out;
}
}  // namespace

int main(int argc, char** argv) {
  using namespace dino::io;
  const float a[6] = {1, -2, 3.5f, 0, 1e-40f, 6};
  const float b[2] = {7, 8};
  std::vector<tensor_entry> e{{"a", {2, 3}, a}, {"b\xc3\xa9", {2}, b}, {"z", {0}, nullptr}, {"s", {}, b}};
  const auto valid = bytes_of(encode_safetensors(e, {{"format", "pt"}, {"k\"\n", "v\\"}}));
  const auto valid_bf16 = bytes_of(encode_safetensors(e, {}, st_dtype::bf16));

  int failures = 0;
  auto expect = [&](bool ok, const char* what) {
    if (!ok) {
      std::fprintf(stderr, "fuzz smoke: %s\n", what);
      ++failures;
    }
  };
  expect(accepted(valid), "the valid file is rejected");
  expect(accepted(valid_bf16), "the valid BF16 file is rejected");

  for (const auto* base : {&valid, &valid_bf16}) {
    feed(*base);
    for (std::size_t len = 0; len < base->size(); ++len) {
      std::vector<std::uint8_t> cut(base->begin(), base->begin() + static_cast<std::ptrdiff_t>(len));
      feed(cut);
      expect(!accepted(cut), "a truncated file is accepted");
    }
    for (std::size_t i = 0; i < base->size(); ++i)
      for (std::uint8_t v : {0x00, 0x01, 0x22, 0x2c, 0x30, 0x39, 0x5c, 0x7b, 0x7d, 0x80, 0xff}) {
        std::vector<std::uint8_t> m = *base;
        m[i] = v;
        feed(m);
        m[i] = static_cast<std::uint8_t>((*base)[i] ^ 0x01);
        feed(m);
      }
  }
  // Header lengths around the real one, and a few hand-made headers.
  for (std::uint64_t n : {0ull, 1ull, 7ull, 8ull, 100'000'001ull, ~0ull}) {
    std::vector<std::uint8_t> m = valid;
    for (int i = 0; i < 8; ++i) m[static_cast<std::size_t>(i)] = static_cast<std::uint8_t>(n >> (8 * i));
    feed(m);
  }
  for (const char* json : {"{}", "{\"__metadata__\":{}}", "{\"x\":{\"dtype\":\"F16\",\"shape\":[],\"data_offsets\":[0,2]}}",
                           "{\"\\ud83d\\ude00\\u0000\":{\"dtype\":\"BF16\",\"shape\":[1],\"data_offsets\":[0,2]}}",
                           "{\"x\":{\"dtype\":\"F64\",\"shape\":[1],\"data_offsets\":[0,8]}}"}) {
    std::string s(json);
    std::vector<std::uint8_t> m;
    for (int i = 0; i < 8; ++i) m.push_back(static_cast<std::uint8_t>(s.size() >> (8 * i)));
    for (char c : s) m.push_back(static_cast<std::uint8_t>(c));
    for (int i = 0; i < 8; ++i) m.push_back(0x7f);
    expect(accepted(m), json);
    feed(m);
  }
  // The committed seed corpus.
  for (int i = 1; i < argc; ++i) {
    if (!std::filesystem::is_directory(argv[i])) continue;
    for (const auto& f : std::filesystem::directory_iterator(argv[i])) {
      std::ifstream in(f.path(), std::ios::binary);
      feed(std::vector<std::uint8_t>(std::istreambuf_iterator<char>(in), {}));
    }
  }
  std::printf("fuzz smoke: %zu inputs, %d failures\n", runs, failures);
  return failures == 0 ? 0 : 1;
}
