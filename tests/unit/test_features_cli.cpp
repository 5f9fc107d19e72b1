// dino-features end to end: a checkpoint written by io::save_params from the PyTorch golden
// model, an input .npy, the tool run as a process; its outputs against the reference's
// features, tokens and CLS attention. Bad inputs exit non-zero with a message.
#include <doctest/doctest.h>

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <string>
#include <vector>

#include <dino/dino.hpp>
#include <dino/io/checkpoint.hpp>
#include <dino/io/npy.hpp>
#include <dino/nn/vit.hpp>

#include "../golden/golden.hpp"
#include "gradcheck.hpp"

using namespace dino;

namespace {
const std::string kDir = DINO_TEST_TMP_DIR;

struct result {
  int code;
  std::string err;
};
result run(const std::string& args) {
  const std::string errf = kDir + "/features_err.txt";
  const int rc = std::system((std::string(DINO_FEATURES_EXE) + " " + args + " 2> " + errf).c_str());
  std::ifstream f(errf);
  std::string err((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  return {WIFEXITED(rc) ? WEXITSTATUS(rc) : -1, err};
}

// The golden model as a safetensors checkpoint named as a teacher dict ("teacher.backbone.*").
std::string write_checkpoint(const dino_golden::file& g) {
  param_layout L;
  nn::vit v(nn::vit_config{16, 4, 3, 20, 2, 2}, L);
  flat_params<float> P(L);
  for (const auto& e : L.entries()) {
    const auto& t = g["param/" + e.name];
    REQUIRE(std::size_t(t.numel()) == e.numel());
    for (std::size_t i = 0; i < e.numel(); ++i) P.data()[e.offset + i] = float(t.values[i]);
  }
  const std::string path = kDir + "/golden_vit.safetensors";
  io::save_params(path, P, "teacher.backbone.");
  return path;
}

double max_rel(const std::vector<float>& a, const std::vector<double>& b) {
  double m = 0, s = 0;
  for (std::size_t i = 0; i < b.size(); ++i) {
    m = std::max(m, std::fabs(double(a[i]) - b[i]));
    s = std::max(s, std::fabs(b[i]));
  }
  return m / s;
}
}  // namespace

TEST_CASE("dino-features matches the PyTorch reference on the golden model") {
  dino_golden::file g(dino_golden::data_path("vit_small_model.bin"));
  const std::string ckpt = write_checkpoint(g);
  for (const char* c : {"a/", "c/"}) {
    CAPTURE(c);
    const auto& x = g[std::string(c) + "x"];
    std::vector<float> xf(x.values.begin(), x.values.end());
    const std::string in = kDir + "/x.npy", out = kDir + "/f.npy", tok = kDir + "/t.npy", att = kDir + "/a.npy";
    io::write_npy(in, x.dims, xf.data());
    auto r = run("--checkpoint " + ckpt + " --heads 2 --input " + in + " --out " + out + " --tokens " + tok +
                 " --attention " + att + " --checkpoint-key teacher --batch 1");
    INFO(r.err);
    REQUIRE(r.code == 0);
    auto f = io::read_npy(out);
    auto t = io::read_npy(tok);
    auto a = io::read_npy(att);
    const auto& cls = g[std::string(c) + "cls"];
    const auto& tokens = g[std::string(c) + "tokens"];
    const auto& attn = g[std::string(c) + "attn"];  // [B, heads, N+1, N+1]
    CHECK(f.shape == cls.dims);
    CHECK(t.shape == tokens.dims);
    CHECK(max_rel(f.data, cls.values) < 1e-5);
    CHECK(max_rel(t.data, tokens.values) < 1e-5);
    const std::int64_t B = attn.dims[0], H = attn.dims[1], N1 = attn.dims[2];
    CHECK(a.shape == std::vector<std::int64_t>{B, H, N1});
    std::vector<double> row0;
    for (std::int64_t b = 0; b < B; ++b)
      for (std::int64_t h = 0; h < H; ++h)
        for (std::int64_t j = 0; j < N1; ++j) row0.push_back(attn.values[std::size_t(((b * H + h) * N1) * N1 + j)]);
    CHECK(max_rel(a.data, row0) < 1e-5);
  }
}

TEST_CASE("dino-features: bad files and inputs fail with a message and a non-zero exit") {
  dino_golden::file g(dino_golden::data_path("vit_small_model.bin"));
  const std::string ckpt = write_checkpoint(g), in = kDir + "/x.npy", out = kDir + "/f.npy";
  std::vector<float> x(2 * 3 * 16 * 16, 0.5f);
  io::write_npy(in, {2, 3, 16, 16}, x.data());
  auto r = run("--checkpoint " + ckpt + " --input " + in + " --out " + out);
  CHECK(r.code == 1);  // D = 20: heads cannot be inferred
  CHECK(r.err.find("give --heads or --arch") != std::string::npos);
  r = run("--checkpoint " + kDir + "/missing.safetensors --heads 2 --input " + in + " --out " + out);
  CHECK(r.code == 1);
  CHECK(r.err.find("missing.safetensors") != std::string::npos);
  {
    std::ofstream bad(kDir + "/bad.safetensors", std::ios::binary);
    bad << "this is not a safetensors file";
  }
  r = run("--checkpoint " + kDir + "/bad.safetensors --heads 2 --input " + in + " --out " + out);
  CHECK(r.code == 1);
  CHECK(r.err.find("bad.safetensors") != std::string::npos);
  std::vector<float> x1(2 * 1 * 16 * 16, 0.5f);
  io::write_npy(in, {2, 1, 16, 16}, x1.data());
  r = run("--checkpoint " + ckpt + " --heads 2 --input " + in + " --out " + out);
  CHECK(r.code == 1);
  CHECK(r.err.find("1 channels, the model takes 3") != std::string::npos);
  std::vector<float> x2(1 * 3 * 18 * 16, 0.5f);
  io::write_npy(in, {1, 3, 18, 16}, x2.data());
  r = run("--checkpoint " + ckpt + " --heads 2 --input " + in + " --out " + out);
  CHECK(r.code == 1);
  CHECK(r.err.find("not a multiple of the patch size 4") != std::string::npos);
  r = run("--checkpoint " + ckpt + " --arch vit_small --input " + in + " --out " + out);
  CHECK(r.code == 1);  // shapes of the file do not fit vit_small
  CHECK(r.err.find("expected") != std::string::npos);
  r = run("--input " + in);
  CHECK(r.code == 2);
  r = run("--checkpoint " + ckpt + " --input " + in + " --out " + out + " --bogus 1");
  CHECK(r.code == 2);
  CHECK(r.err.find("unknown option --bogus") != std::string::npos);
}

TEST_CASE("a ViT saved and loaded gives identical outputs") {
  param_layout L;
  nn::vit_config c{16, 4, 3, 20, 2, 2};
  nn::vit v(c, L);
  flat_params<float> P(L), Q(L);
  nn::initialize(P, 42);
  const std::string path = kDir + "/roundtrip.safetensors";
  io::save_params(path, P, "student.module.backbone.");
  auto r = io::load_params(path, Q);
  CHECK(r.loaded.size() == L.entries().size());
  CHECK(r.unused.empty());
  auto pk = v.make_pack<float>({{2, 16, 12}});
  std::vector<float> x(2 * 3 * 16 * 12);
  dino_test::fill_normal(x, 3);
  const float* img = x.data();
  std::vector<float> y1(2 * 20), y2(2 * 20), scratch(v.infer_scratch_elems(pk));
  const cpu_policy pol{2};
  for (auto [params, y] : {std::pair{&P, &y1}, std::pair{&Q, &y2}})
    v.infer(pol, host_view<const float>{params->data(), {std::int64_t(params->size())}, "P"}, pk,
            std::span<const float* const>(&img, 1), host_view<float>{y->data(), {2, 20}, "y"},
            host_view<float>{scratch.data(), {std::int64_t(scratch.size())}, "scratch"});
  CHECK(y1 == y2);
  // a layout with another shape is refused, naming the tensor
  param_layout L2;
  nn::vit w(nn::vit_config{16, 4, 3, 20, 3, 2}, L2);  // depth 3: blocks.2 is missing
  flat_params<float> R(L2);
  CHECK_THROWS_WITH_AS(io::load_params(path, R), doctest::Contains("blocks.2."), io_error);
}
