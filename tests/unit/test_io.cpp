// safetensors reading and writing, checkpoints by state_dict name, atomic writes.
// Every corrupt file is written by the test itself; each case expects io_error and a message
// naming the file and what was wrong.
#include <doctest/doctest.h>

#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <deque>
#include <filesystem>
#include <fstream>
#include <limits>
#include <string>
#include <vector>

#include <unistd.h>

#include <dino/core/param_store.hpp>
#include <dino/io/atomic_file.hpp>
#include <dino/io/checkpoint.hpp>
#include <dino/io/safetensors.hpp>
#include <dino/ssl/dino_head.hpp>

using namespace dino;
using namespace dino::io;
namespace fs = std::filesystem;

namespace {

template <class E, class F>
std::string message_of(F&& f) {
  try {
    f();
  } catch (const E& e) {
    return e.what();
  }
  FAIL("expected exception not thrown");
  return {};
}
bool contains(const std::string& s, const std::string& part) { return s.find(part) != std::string::npos; }
load_options opts(std::string key, std::string prefix = "", bool strict = false) {
  load_options o;
  o.checkpoint_key = std::move(key);
  o.prefix = std::move(prefix);
  o.strict = strict;
  return o;
}

// A fresh directory per test binary run, removed at exit.
const fs::path& scratch() {
  static struct dir {
    fs::path p;
    dir() {
      p = fs::temp_directory_path() / ("dino_test_io_" + std::to_string(::getpid()));
      fs::remove_all(p);
      fs::create_directories(p);
    }
    ~dir() {
      std::error_code ec;
      fs::permissions(p, fs::perms::owner_all, fs::perm_options::add, ec);
      fs::remove_all(p, ec);
    }
  } d;
  return d.p;
}
std::string path_of(const std::string& name) { return (scratch() / name).string(); }

void write_bytes(const std::string& path, const std::vector<std::byte>& b) {
  std::ofstream o(path, std::ios::binary | std::ios::trunc);
  o.write(reinterpret_cast<const char*>(b.data()), static_cast<std::streamsize>(b.size()));
}
std::string read_text(const std::string& path) {
  std::ifstream i(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(i), {}};
}
// A file from a raw header text and data_bytes bytes of data (value i at byte i).
std::vector<std::byte> raw_file(const std::string& json, std::size_t data_bytes, std::uint64_t header_len = ~0ull) {
  std::uint64_t n = header_len == ~0ull ? json.size() : header_len;
  std::vector<std::byte> b(8);
  for (int i = 0; i < 8; ++i) b[std::size_t(i)] = std::byte((n >> (8 * i)) & 0xff);
  for (char c : json) b.push_back(std::byte(static_cast<unsigned char>(c)));
  for (std::size_t i = 0; i < data_bytes; ++i) b.push_back(std::byte(i & 0xff));
  return b;
}
// Writes the file and returns the io_error message from reading it.
std::string read_error(const std::string& name, const std::vector<std::byte>& bytes) {
  std::string p = path_of(name);
  write_bytes(p, bytes);
  std::string m = message_of<io_error>([&] { (void)safetensors_file::read(p); });
  CHECK_MESSAGE(contains(m, p), m);
  return m;
}
std::vector<std::string> temp_files_in(const fs::path& dir) {
  std::vector<std::string> out;
  for (const auto& e : fs::directory_iterator(dir))
    if (contains(e.path().filename().string(), ".tmp.")) out.push_back(e.path().string());
  return out;
}

const std::vector<float> a_vals{1, 2, 3, 4, 5, 6}, b_vals{-1, 0.5f, 1e-30f, 3e38f};
std::vector<std::byte> valid_two() {
  std::vector<tensor_entry> e{{"a", {2, 3}, a_vals.data()}, {"b", {4}, b_vals.data()}};
  return encode_safetensors(e, {{"note", "two tensors"}});
}

}  // namespace

// ------------------------------------------------------------------ number conversions

TEST_CASE("F16 and BF16 decode to the exact float values") {
  CHECK(half_to_float(0x3c00) == 1.0f);
  CHECK(half_to_float(0xc000) == -2.0f);
  CHECK(half_to_float(0x7bff) == 65504.0f);
  CHECK(half_to_float(0x3555) == 0.333251953125f);
  CHECK(half_to_float(0x0001) == std::ldexp(1.0f, -24));  // smallest subnormal
  CHECK(half_to_float(0x03ff) == 1023 * std::ldexp(1.0f, -24));
  CHECK(half_to_float(0x0400) == std::ldexp(1.0f, -14));  // smallest normal
  CHECK(std::bit_cast<std::uint32_t>(half_to_float(0x8000)) == 0x80000000u);  // -0
  CHECK(half_to_float(0x7c00) == std::numeric_limits<float>::infinity());
  CHECK(half_to_float(0xfc00) == -std::numeric_limits<float>::infinity());
  CHECK(std::isnan(half_to_float(0x7e00)));

  CHECK(bf16_to_float(0x3f80) == 1.0f);
  CHECK(bf16_to_float(0xc040) == -3.0f);
  CHECK(bf16_to_float(0x4049) == 3.140625f);
  CHECK(bf16_to_float(0x0001) == std::bit_cast<float>(0x00010000u));
  CHECK(bf16_to_float(0x7f80) == std::numeric_limits<float>::infinity());
  CHECK(std::isnan(bf16_to_float(0x7fc0)));

  CHECK(float_to_bf16(1.0f) == 0x3f80);
  CHECK(float_to_bf16(3.14159265f) == 0x4049);
  CHECK(float_to_bf16(std::bit_cast<float>(0x3f808000u)) == 0x3f80);  // tie: to even
  CHECK(float_to_bf16(std::bit_cast<float>(0x3f818000u)) == 0x3f82);  // tie: to even
  CHECK(float_to_bf16(std::bit_cast<float>(0x3f808001u)) == 0x3f81);  // above the tie
  CHECK(float_to_bf16(std::numeric_limits<float>::max()) == 0x7f80);  // overflows to inf
  CHECK(std::isnan(bf16_to_float(float_to_bf16(std::numeric_limits<float>::quiet_NaN()))));
  CHECK(std::isnan(bf16_to_float(float_to_bf16(std::bit_cast<float>(0x7f800001u)))));  // signalling NaN stays NaN
}

TEST_CASE("F16, BF16 and F64 tensors convert to float; integer tensors open but do not convert") {
  const std::uint16_t h[4] = {0x3c00, 0xc000, 0x0001, 0x7c00};
  const std::uint16_t bf[2] = {0x3f80, 0x4049};
  const double d[3] = {0.1, -1e300, 2.5};
  std::string json = R"({"h":{"dtype":"F16","shape":[2,2],"data_offsets":[0,8]},)"
                     R"("bf":{"dtype":"BF16","shape":[2],"data_offsets":[8,12]},)"
                     R"("d":{"dtype":"F64","shape":[3],"data_offsets":[16,40]},)"
                     R"("n":{"dtype":"I64","shape":[],"data_offsets":[40,48]}})";
  auto bytes = raw_file(json, 0);
  auto put = [&](const void* p, std::size_t n) {
    auto* c = static_cast<const std::byte*>(p);
    bytes.insert(bytes.end(), c, c + n);
  };
  put(h, 8);  // the host is little-endian on every platform we build for; checked below
  put(bf, 4);
  bytes.resize(bytes.size() + 4);
  put(d, 24);
  std::int64_t n = 7;
  put(&n, 8);
  REQUIRE(std::endian::native == std::endian::little);
  auto f = safetensors_file::parse(bytes, "mem");
  auto hv = f.to_float(f.at("h"));
  CHECK(hv == std::vector<float>{1.0f, -2.0f, std::ldexp(1.0f, -24), std::numeric_limits<float>::infinity()});
  CHECK(f.to_float(f.at("bf")) == std::vector<float>{1.0f, 3.140625f});
  auto dv = f.to_float(f.at("d"));
  CHECK(dv[0] == 0.1f);
  CHECK(dv[1] == -std::numeric_limits<float>::infinity());
  CHECK(dv[2] == 2.5f);
  CHECK(f.at("n").shape.empty());
  CHECK(f.at("n").numel() == 1);
  std::string m = message_of<io_error>([&] { (void)f.to_float(f.at("n")); });
  CHECK(contains(m, "'n'"));
  CHECK(contains(m, "I64"));
  std::vector<float> small(3);
  CHECK(contains(message_of<io_error>([&] { f.to_float(f.at("h"), std::span<float>(small)); }), "output holds 3"));
}

// ------------------------------------------------------------------ valid files

TEST_CASE("safetensors round trip: names, shapes, metadata, values, alignment") {
  std::string p = path_of("two.safetensors");
  std::vector<tensor_entry> e{{"a", {2, 3}, a_vals.data()}, {"b", {4}, b_vals.data()}};
  write_safetensors(p, e, {{"note", "two \"tensors\"\n\x01 caf\xc3\xa9"}});
  auto f = safetensors_file::read(p);
  REQUIRE(f.tensors().size() == 2);
  CHECK(f.tensors()[0].name == "a");
  CHECK(f.at("a").shape == std::vector<std::int64_t>{2, 3});
  CHECK(f.at("a").dtype == st_dtype::f32);
  CHECK(f.to_float(f.at("a")) == a_vals);
  CHECK(f.to_float(f.at("b")) == b_vals);
  CHECK(f.metadata().at("note") == "two \"tensors\"\n\x01 caf\xc3\xa9");
  CHECK(f.find("c") == nullptr);
  CHECK(contains(message_of<io_error>([&] { (void)f.at("c"); }), "no tensor named 'c'"));
  auto bytes = valid_two();
  std::uint64_t n = 0;
  std::memcpy(&n, bytes.data(), 8);
  CHECK((8 + n) % 8 == 0);  // the data starts aligned
  CHECK(temp_files_in(scratch()).empty());
}

TEST_CASE("safetensors reader accepts escapes, empty and scalar tensors, padding") {
  std::string json = R"( { "caf\u00e9\ud83d\ude00\t\"x\"\\\/" : {"data_offsets":[0,4], "shape":[], "dtype":"F32"},)"
                     R"( "empty":{"dtype":"F32","shape":[0,5],"data_offsets":[4,4]},)"
                     R"( "__metadata__":{"format":"pt","k\n":""}, "h":{"dtype":"F16","shape":[1],"data_offsets":[4,6]} }   )";
  auto f = safetensors_file::parse(raw_file(json, 6), "mem");
  REQUIRE(f.tensors().size() == 3);
  CHECK(f.tensors()[0].name == "caf\xc3\xa9\xf0\x9f\x98\x80\t\"x\"\\/");
  CHECK(f.at("empty").numel() == 0);
  CHECK(f.to_float(f.at("empty")).empty());
  CHECK(f.metadata().at("format") == "pt");
  CHECK(f.metadata().count("k\n") == 1);
  auto e = safetensors_file::parse(raw_file("{}", 0), "mem");
  CHECK(e.tensors().empty());
}

// ------------------------------------------------------------------ corrupt files

TEST_CASE("truncated files are rejected at every stage") {
  auto good = valid_two();
  std::uint64_t n = 0;
  std::memcpy(&n, good.data(), 8);
  auto cut = [&](std::size_t len) { return std::vector<std::byte>(good.begin(), good.begin() + std::ptrdiff_t(len)); };
  CHECK(contains(read_error("t0", cut(0)), "file too short (0 bytes)"));
  CHECK(contains(read_error("t5", cut(5)), "file too short (5 bytes)"));
  CHECK(contains(read_error("t8", cut(8)), "larger than the file"));
  CHECK(contains(read_error("t20", cut(20)), "larger than the file"));
  CHECK(contains(read_error("th", cut(8 + std::size_t(n) - 1)), "larger than the file"));
  std::string m = read_error("td", cut(8 + std::size_t(n) + 10));
  CHECK(contains(m, "outside the data buffer (10 bytes)"));
  CHECK(contains(read_error("tl", cut(good.size() - 1)), "outside the data buffer"));
  // Every truncation fails with io_error, never anything else.
  for (std::size_t len = 0; len < good.size(); ++len)
    CHECK_THROWS_AS((void)safetensors_file::parse(cut(len), "cut"), io_error);
}

TEST_CASE("header length larger than the file or absurd") {
  std::string json = R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}})";
  std::string m = read_error("big", raw_file(json, 4, 1000));
  CHECK(contains(m, "header length 1000 is larger than the file"));
  m = read_error("absurd", raw_file(json, 4, 1ull << 40));
  CHECK(contains(m, "absurd"));
  m = read_error("huge", raw_file(json, 4, ~0ull - 1));
  CHECK(contains(m, "absurd"));
}

TEST_CASE("invalid JSON headers name the byte position") {
  const std::string t = R"("a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]})";
  struct bad {
    std::string json, what;
  };
  const std::vector<bad> cases{
      {"", "unexpected end of the header"},
      {"[]", "expected '{'"},
      {"{" + t, "expected ',' or '}'"},
      {"{" + t + ",}", "expected a string"},
      {"{" + t + "} x", "unexpected characters after the JSON object"},
      {R"({"a" {"dtype":"F32","shape":[1],"data_offsets":[0,4]}})", "expected ':'"},
      {R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4.0]}})", "fraction or exponent"},
      {R"({"a":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}})", "negative number"},
      {R"({"a":{"dtype":"F32","shape":[01],"data_offsets":[0,4]}})", "leading zero"},
      {R"({"a":{"dtype":"F32","shape":[99999999999999999999],"data_offsets":[0,4]}})", "integer too large"},
      {R"({"a":{"dtype":"F32","shape":[1,],"data_offsets":[0,4]}})", "expected a non-negative integer"},
      {R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4],"x":1}})", "unexpected key 'x'"},
      {R"({"a":{"dtype":F32,"shape":[1],"data_offsets":[0,4]}})", "expected a string"},
      {R"({"a\q":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}})", "invalid escape"},
      {R"({"a\u12":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}})", "hexadecimal"},
      {R"({"\udc00":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}})", "unpaired low surrogate"},
      {R"({"\ud800x":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}})", "high surrogate"},
      {"{\"a\xff\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}", "invalid UTF-8"},
      {"{\"a\xc0\x80\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}", "invalid UTF-8"},
      {"{\"a\n\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}", "control character"},
      {R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"__metadata__":{"k":1}})", "must be a string"},
      {R"({"a":{"dtype":"F32","dtype":"F32","shape":[1],"data_offsets":[0,4]}})", "\"dtype\" appears twice"},
      {R"({"__metadata__":{},"__metadata__":{}})", "\"__metadata__\" appears twice"},
      {R"({"a":{}})", "empty tensor entry"},
      {R"({"a":[]})", "expected '{' to open a tensor entry"},
  };
  int i = 0;
  for (const auto& c : cases) {
    std::string m = read_error("json" + std::to_string(i++), raw_file(c.json, 4));
    CHECK_MESSAGE(contains(m, "invalid JSON header at byte"), m);
    CHECK_MESSAGE(contains(m, c.what), m);
  }
  std::string m = read_error("jsonpos", raw_file(R"({"a" {})", 0));
  CHECK_MESSAGE(contains(m, "at byte 5 of 7: expected ':'"), m);
}

TEST_CASE("semantic errors: dtype, offsets, overlap, shape vs size, duplicates, missing fields") {
  auto one = [](const std::string& entry) { return R"({"a":{)" + entry + "}}"; };
  std::string m = read_error("dtype", raw_file(one(R"("dtype":"F17","shape":[1],"data_offsets":[0,4])"), 4));
  CHECK(contains(m, "tensor 'a': unknown dtype 'F17'"));
  m = read_error("range", raw_file(one(R"("dtype":"F32","shape":[250],"data_offsets":[0,1000])"), 8));
  CHECK(contains(m, "tensor 'a': data_offsets [0, 1000] lie outside the data buffer (8 bytes)"));
  m = read_error("reversed", raw_file(one(R"("dtype":"F32","shape":[1],"data_offsets":[8,4])"), 8));
  CHECK(contains(m, "are reversed"));
  m = read_error("shape", raw_file(one(R"("dtype":"F32","shape":[2,3],"data_offsets":[0,20])"), 24));
  CHECK(contains(m, "tensor 'a': shape [2, 3] of F32 needs 24 bytes but data_offsets [0, 20] hold 20"));
  m = read_error("huge", raw_file(one(R"("dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,4])"), 8));
  CHECK(contains(m, "too large"));
  m = read_error("count", raw_file(one(R"("dtype":"F32","shape":[1],"data_offsets":[0,4,8])"), 8));
  CHECK(contains(m, "data_offsets must hold 2 integers, found 3"));
  m = read_error("missing", raw_file(one(R"("dtype":"F32","shape":[1])"), 8));
  CHECK(contains(m, "tensor 'a': entry at byte 1 lacks \"data_offsets\""));
  m = read_error("overlap", raw_file(R"({"a":{"dtype":"F32","shape":[6],"data_offsets":[0,24]},)"
                                     R"("b":{"dtype":"F32","shape":[4],"data_offsets":[16,32]}})",
                                     32));
  CHECK(contains(m, "tensors 'a' [0, 24) and 'b' [16, 32) overlap"));
  m = read_error("dup", raw_file(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},)"
                                 R"("a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})",
                                 8));
  CHECK(contains(m, "duplicate tensor name 'a'"));
  // Adjacent tensors and a zero-size tensor inside another's range do not overlap.
  CHECK_NOTHROW((void)safetensors_file::parse(raw_file(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},)"
                                                       R"("z":{"dtype":"F32","shape":[0],"data_offsets":[2,2]},)"
                                                       R"("b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})",
                                                       8),
                                              "mem"));
}

TEST_CASE("reading a missing file or a directory fails with io_error naming it") {
  std::string p = path_of("does_not_exist.safetensors");
  std::string m = message_of<io_error>([&] { (void)safetensors_file::read(p); });
  CHECK(contains(m, p));
  CHECK(contains(m, "cannot open"));
  m = message_of<io_error>([&] { (void)safetensors_file::read(scratch().string()); });
  CHECK(contains(m, "not a regular file"));
}

TEST_CASE("the writer refuses entries it could not read back") {
  float x = 1;
  std::string p = path_of("refused.safetensors");
  auto err = [&](std::vector<tensor_entry> e, const metadata_map& m = {}) {
    return message_of<io_error>([&] { write_safetensors(p, e, m); });
  };
  CHECK(contains(err({{"a", {1}, &x}, {"a", {1}, &x}}), "duplicate tensor name 'a'"));
  CHECK(contains(err({{"__metadata__", {1}, &x}}), "'__metadata__' cannot name a tensor"));
  CHECK(contains(err({{"a", {-1}, &x}}), "negative extent"));
  CHECK(contains(err({{"a", {2}, nullptr}}), "has no data"));
  CHECK(contains(err({{"a\xff", {1}, &x}}), "not valid UTF-8"));
  CHECK(contains(err({{"a", {1}, &x}}, {{"k", "\xc3"}}), "not valid UTF-8"));
  CHECK(!fs::exists(p));
  CHECK(temp_files_in(scratch()).empty());
}

// ------------------------------------------------------------------ checkpoints

namespace {
param_layout small_layout(const std::string& prefix = "") {
  param_layout l;
  l.add(prefix + "cls_token", {1, 1, 4}, param_none, param_init::zeros);
  l.add(prefix + "blocks.0.attn.qkv.weight", {12, 4}, param_none, param_init::zeros);
  l.add(prefix + "blocks.0.attn.qkv.bias", {12}, param_no_weight_decay, param_init::zeros);
  l.add(prefix + "norm.weight", {4}, param_no_weight_decay, param_init::ones);
  return l;
}
void fill(flat_params<float>& p, float base) {
  for (const auto& e : p.layout().entries())
    for (std::size_t i = 0; i < e.numel(); ++i) p.data()[e.offset + i] = base + float(e.offset + i) * 0.25f;
}
bool same_values(const flat_params<float>& a, const flat_params<float>& b) {
  for (const auto& e : a.layout().entries())
    if (std::memcmp(a.data() + e.offset, b.data() + e.offset, e.numel() * sizeof(float)) != 0) return false;
  return true;
}
// A file with each of the given names holding the values of the small layout, offset by base.
std::string write_named(const std::string& file, const std::vector<std::pair<std::string, float>>& groups,
                        const metadata_map& meta = {}) {
  static const param_layout layout = small_layout();
  std::deque<flat_params<float>> keep;  // stable addresses until the write
  std::vector<tensor_entry> entries;
  for (const auto& [prefix, base] : groups) {
    keep.emplace_back(layout);
    fill(keep.back(), base);
    for (const auto& e : layout.entries()) {
      tensor_entry t{prefix + e.name, {}, keep.back().data() + e.offset};
      for (int i = 0; i < e.shape.rank; ++i) t.shape.push_back(e.shape[i]);
      entries.push_back(t);
    }
  }
  std::string p = path_of(file);
  write_safetensors(p, entries, meta);
  return p;
}
}  // namespace

TEST_CASE("save_params then load_params gives identical values (F32) and BF16-rounded values (BF16)") {
  param_layout l = small_layout();
  flat_params<float> a(l), b(l), c(l);
  fill(a, -3.0f);
  a.data()[0] = -0.0f;
  a.data()[1] = std::numeric_limits<float>::denorm_min();
  a.data()[2] = std::numeric_limits<float>::max();
  a.data()[3] = 1.00390625f;  // a bf16 tie
  std::string p = path_of("params.safetensors");
  save_params(p, a, "", {{"epoch", "3"}});
  auto r = load_params(p, b);
  CHECK(same_values(a, b));
  CHECK(r.loaded.size() == 4);
  CHECK(r.unused.empty());
  auto f = safetensors_file::read(p);
  CHECK(f.metadata().at("epoch") == "3");
  CHECK(f.metadata().at("format") == "pt");

  std::string q = path_of("params_bf16.safetensors");
  save_params(q, a, "", {}, st_dtype::bf16);
  CHECK(safetensors_file::read(q).at("norm.weight").dtype == st_dtype::bf16);
  load_params(q, c);
  for (const auto& e : l.entries())
    for (std::size_t i = 0; i < e.numel(); ++i) {
      float x = a.data()[e.offset + i];
      CHECK(std::bit_cast<std::uint32_t>(c.data()[e.offset + i]) == std::bit_cast<std::uint32_t>(bf16_to_float(float_to_bf16(x))));
    }
  CHECK(c.data()[3] == 1.0f);
  CHECK(std::isinf(c.data()[2]));
}

TEST_CASE("DINO head: a method's 'head.' tensors load into a bare head layout with a prefix") {
  ssl::dino_head_config cfg{8, 16, 12, 6, 3, true};
  param_layout lm, lh;
  ssl::dino_head hm(cfg, lm, "head."), hh(cfg, lh);
  flat_params<float> pm(lm), ph(lh);
  fill(pm, 0.5f);
  std::string p = path_of("head.safetensors");
  save_params(p, pm);
  auto f = safetensors_file::read(p);
  REQUIRE(f.find("head.last_layer.weight_g") != nullptr);
  CHECK(f.at("head.last_layer.weight_g").shape == std::vector<std::int64_t>{16, 1});
  CHECK(f.at("head.mlp.4.weight").shape == std::vector<std::int64_t>{6, 12});
  // Without the prefix the bare names are not in the file.
  CHECK(contains(message_of<io_error>([&] { load_params(f, ph); }), "tensor 'mlp.0.weight' not found"));
  load_params(f, ph, opts("", "head."));
  for (const auto& e : lh.entries())
    CHECK(std::memcmp(ph.data() + e.offset, pm.data() + lm.at("head." + e.name).offset, e.numel() * 4) == 0);
  // The other direction: a bare head file into the method's names via save_params' prefix.
  std::string q = path_of("head_bare.safetensors");
  save_params(q, ph);
  flat_params<float> pm2(lm);
  CHECK_THROWS_AS(load_params(q, pm2), io_error);
  save_params(q, ph, "head.");
  load_params(q, pm2);
  CHECK(same_values(pm, pm2));
}

TEST_CASE("prefixes: bare, backbone., module.backbone., teacher./student. groups") {
  param_layout bare = small_layout(), method = small_layout("backbone.");
  flat_params<float> pb(bare), pm(method), ref(bare);
  fill(ref, 10.0f);
  for (const std::string prefix : {"", "backbone.", "module.backbone.", "module.", "teacher.backbone."}) {
    CAPTURE(prefix);
    std::string p = write_named("pre.safetensors", {{prefix, 10.0f}});
    pb.fill_zero();
    pm.fill_zero();
    load_params(p, pb, opts("", "", true));
    load_params(p, pm, opts("", "", true));
    CHECK(same_values(pb, ref));
    CHECK(std::memcmp(pm.data(), pb.data(), pb.size() * 4) == 0);
  }

  std::string both = write_named("both.safetensors", {{"teacher.backbone.", 1.0f}, {"student.module.backbone.", 2.0f}});
  std::string m = message_of<io_error>([&] { load_params(both, pb); });
  CHECK(contains(m, "tensor 'cls_token' is ambiguous"));
  CHECK(contains(m, "teacher.backbone.cls_token"));
  CHECK(contains(m, "checkpoint_key"));
  flat_params<float> t(bare), s(bare);
  fill(t, 1.0f);
  fill(s, 2.0f);
  auto r = load_params(both, pm, opts("teacher", "", true));
  CHECK(std::memcmp(pm.data(), t.data(), t.size() * 4) == 0);
  CHECK(r.skipped.size() == 4);
  CHECK(r.unused.empty());
  CHECK(r.loaded[0].layout_name == "backbone.cls_token");
  CHECK(r.loaded[0].file_name == "teacher.backbone.cls_token");
  load_params(both, pb, opts("student"));
  CHECK(same_values(pb, s));

  // checkpoint_key prefers its group over names without a group.
  std::string mixed = write_named("mixed.safetensors", {{"", 5.0f}, {"teacher.", 1.0f}});
  r = load_params(mixed, pb, opts("teacher"));
  CHECK(same_values(pb, t));
  CHECK(r.unused.size() == 4);
  CHECK(contains(message_of<io_error>([&] { load_params(mixed, pb); }), "ambiguous"));

  // Names without a group take the file's checkpoint_key metadata.
  std::string stud = write_named("stud.safetensors", {{"module.backbone.", 2.0f}}, {{"checkpoint_key", "student"}});
  m = message_of<io_error>([&] { load_params(stud, pb, opts("teacher")); });
  CHECK(contains(m, "tensor 'cls_token' not found"));
  CHECK(contains(m, "outside checkpoint_key \"teacher\""));
  load_params(stud, pb, opts("student"));
  CHECK(same_values(pb, s));
  CHECK_THROWS_AS(load_params(stud, pb, opts("ema")), config_error);
}

TEST_CASE("missing tensors, shape mismatches, dtypes, unused tensors and strict") {
  param_layout l = small_layout();
  flat_params<float> p(l);
  fill(p, 7.0f);
  std::vector<float> before(p.data(), p.data() + p.size());

  std::vector<float> w(48, 1.0f);
  std::vector<tensor_entry> e{{"cls_token", {1, 1, 4}, w.data()},
                              {"blocks.0.attn.qkv.weight", {4, 12}, w.data()},
                              {"blocks.0.attn.qkv.bias", {12}, w.data()},
                              {"norm.weight", {4}, w.data()}};
  std::string f = path_of("shape.safetensors");
  write_safetensors(f, e);
  std::string m = message_of<io_error>([&] { load_params(f, p); });
  CHECK(contains(m, f));
  CHECK(contains(m, "tensor 'blocks.0.attn.qkv.weight'"));
  CHECK(contains(m, "expected shape [12, 4], found [4, 12]"));
  CHECK(std::equal(before.begin(), before.end(), p.data()));  // nothing written on failure

  e[1].shape = {12, 4};
  e.pop_back();
  write_safetensors(f, e);
  m = message_of<io_error>([&] { load_params(f, p); });
  CHECK(contains(m, "tensor 'norm.weight' not found"));

  std::string q = write_named("extra.safetensors", {{"", 1.0f}});
  {
    // Add an unused head tensor and an integer tensor (BatchNorm's counter) to a copy.
    auto src = safetensors_file::read(q);
    std::vector<std::vector<float>> vals;
    std::vector<tensor_entry> all;
    for (const auto& t : src.tensors()) vals.push_back(src.to_float(t));
    for (std::size_t i = 0; i < src.tensors().size(); ++i) all.push_back({src.tensors()[i].name, src.tensors()[i].shape, vals[i].data()});
    all.push_back({"head.mlp.0.weight", {2, 2}, w.data()});
    write_safetensors(q, all);
  }
  auto r = load_params(q, p);
  CHECK(r.unused == std::vector<std::string>{"head.mlp.0.weight"});
  m = message_of<io_error>([&] { load_params(q, p, opts("", "", true)); });
  CHECK(contains(m, "1 tensor(s) in the file are not used by the layout (strict): 'head.mlp.0.weight'"));

  std::string ints = R"({"cls_token":{"dtype":"I64","shape":[1,1,4],"data_offsets":[0,32]}})";
  auto sf = safetensors_file::parse(raw_file(ints, 32), "ints.safetensors");
  param_layout one;
  one.add("cls_token", {1, 1, 4}, param_none, param_init::zeros);
  flat_params<float> po(one);
  m = message_of<io_error>([&] { load_params(sf, po); });
  CHECK(contains(m, "ints.safetensors"));
  CHECK(contains(m, "tensor 'cls_token' (file name 'cls_token') has dtype I64"));
}

TEST_CASE("new PyTorch weight-norm names map to weight_g / weight_v") {
  CHECK(canonical_param_name("teacher.module.backbone.head.last_layer.parametrizations.weight.original0") ==
        "head.last_layer.weight_g");
  CHECK(canonical_param_name("head.last_layer.parametrizations.weight.original1") == "head.last_layer.weight_v");
  CHECK(canonical_param_name("backbone.blocks.0.norm1.weight") == "blocks.0.norm1.weight");
  CHECK(canonical_param_name("teacher") == "teacher");
  param_layout l;
  l.add("head.last_layer.weight_g", {3, 1}, param_none, param_init::ones);
  flat_params<float> p(l);
  float g[3] = {4, 5, 6};
  std::vector<tensor_entry> e{{"module.head.last_layer.parametrizations.weight.original0", {3, 1}, g}};
  std::string f = path_of("wn.safetensors");
  write_safetensors(f, e);
  load_params(f, p);
  CHECK(p.data()[2] == 6.0f);
}

// ------------------------------------------------------------------ atomic writes

TEST_CASE("atomic writes: no temporary file left, the target never clobbered by a failed write") {
  std::string target = path_of("atomic.bin");
  {
    std::vector<std::byte> old{std::byte{'o'}, std::byte{'l'}, std::byte{'d'}};
    write_file_atomic(target, old);
  }
  CHECK(read_text(target) == "old");
  CHECK(temp_files_in(scratch()).empty());

  // An exception while the content is produced: the temporary file goes, the target stays.
  try {
    atomic_file f(target);
    f.write("new content", 11);
    CHECK(fs::exists(f.temp_path()));
    CHECK(fs::path(f.temp_path()).parent_path() == scratch());
    throw std::runtime_error("producer failed");
  } catch (const std::runtime_error&) {
  }
  CHECK(read_text(target) == "old");
  CHECK(temp_files_in(scratch()).empty());

  // A directory that does not exist.
  std::string nowhere = path_of("no_such_dir/file.safetensors");
  float x = 1;
  std::vector<tensor_entry> e{{"x", {1}, &x}};
  std::string m = message_of<io_error>([&] { write_safetensors(nowhere, e); });
  CHECK(contains(m, nowhere));
  CHECK(contains(m, "No such file or directory"));
  CHECK(!fs::exists(scratch() / "no_such_dir"));

  // The rename fails (the target is a directory): the directory stays, no temporary file remains.
  fs::create_directories(scratch() / "is_a_dir");
  m = message_of<io_error>([&] { write_safetensors(path_of("is_a_dir"), e); });
  CHECK(contains(m, "cannot rename"));
  CHECK(fs::is_directory(scratch() / "is_a_dir"));
  CHECK(temp_files_in(scratch()).empty());

  // A directory without write permission (root ignores permissions, so only as a user).
  if (::geteuid() != 0) {
    fs::path ro = scratch() / "read_only";
    fs::create_directories(ro);
    write_file_atomic((ro / "f").string(), std::vector<std::byte>{std::byte{'a'}});
    fs::permissions(ro, fs::perms::owner_read | fs::perms::owner_exec);
    m = message_of<io_error>([&] { write_safetensors((ro / "f").string(), e); });
    CHECK(contains(m, "Permission denied"));
    fs::permissions(ro, fs::perms::owner_all);
    CHECK(read_text((ro / "f").string()) == "a");
    CHECK(temp_files_in(ro).empty());
  }

  // A successful write replaces the old content.
  write_safetensors(target, e);
  CHECK(safetensors_file::read(target).to_float(safetensors_file::read(target).at("x"))[0] == 1.0f);
  CHECK(temp_files_in(scratch()).empty());
}
