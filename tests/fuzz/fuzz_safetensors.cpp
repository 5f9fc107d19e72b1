// libFuzzer entry point for the safetensors reader (built as fuzz_safetensors with the
// `fuzz` preset, and as fuzz_safetensors_smoke with an ordinary main for CI).
//
// Any input must either parse or throw a dino::error; nothing else may escape, crash or
// trip a sanitizer. A file that parses must also round-trip: its float tensors and metadata,
// written again by encode_safetensors, read back with the same names, shapes, metadata and
// bit-identical values. A broken property aborts (a crash to the fuzzer).
#include <bit>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <span>
#include <vector>

#include <dino/core/error.hpp>
#include <dino/io/safetensors.hpp>

namespace {
void check(bool ok) {
  if (!ok) std::abort();
}

void round_trip(const dino::io::safetensors_file& f) {
  using namespace dino::io;
  std::vector<std::vector<float>> values;
  std::vector<tensor_entry> entries;
  for (const auto& t : f.tensors()) {
    check(f.find(t.name) == &t);
    check(f.raw(t).size() == t.nbytes());
    if (!is_float_dtype(t.dtype)) continue;
    values.push_back(f.to_float(t));
    check(values.back().size() == static_cast<std::size_t>(t.numel()));
  }
  std::size_t k = 0;
  for (const auto& t : f.tensors())
    if (is_float_dtype(t.dtype)) entries.push_back({t.name, t.shape, values[k++].data()});

  auto bytes = encode_safetensors(entries, f.metadata());
  auto g = safetensors_file::parse(bytes, "round trip");
  check(g.tensors().size() == entries.size());
  check(g.metadata() == f.metadata());
  for (std::size_t i = 0; i < entries.size(); ++i) {
    const tensor_info& t = g.tensors()[i];
    check(t.name == entries[i].name && t.shape == entries[i].shape && t.dtype == st_dtype::f32);
    auto v = g.to_float(t);
    check(v.size() == values[i].size());
    if (!v.empty()) check(std::memcmp(v.data(), values[i].data(), v.size() * sizeof(float)) == 0);
  }
}
}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  try {
    auto f = dino::io::safetensors_file::parse(std::span<const std::byte>(reinterpret_cast<const std::byte*>(data), size),
                                               "fuzz input");
    round_trip(f);
  } catch (const dino::error&) {
  }
  return 0;
}
