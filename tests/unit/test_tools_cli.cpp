// dino-train and dino-eval end to end, as processes: a tiny training run on a synthetic IDX
// data set written here (4 classes of 28 x 28 shapes on a black background), --resume, then
// dino-eval knn (checkpoint, random init, raw pixels), linear, attention and curves on it; the
// JSON results hold sane values and the PNGs are PNGs. Bad inputs exit 1 or 2 with a message.
// --checkpoint-blocks gives the same log and checkpoint, --bf16 a close one; SIGTERM stops a run
// with its state saved.
#include <doctest/doctest.h>

#include <sys/wait.h>

#include <cmath>
#include <csignal>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "shapes.hpp"

namespace {
namespace fs = std::filesystem;
const std::string kDir = DINO_TEST_TMP_DIR;

struct result {
  int code;
  std::string out, err;
};

std::string slurp(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return std::string((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
}

result run(const std::string& exe, const std::string& args) {
  const std::string o = kDir + "/stdout.txt", e = kDir + "/stderr.txt";
  const int rc = std::system((exe + " " + args + " > " + o + " 2> " + e).c_str());
  return {WIFEXITED(rc) ? WEXITSTATUS(rc) : -1, slurp(o), slurp(e)};
}
result train(const std::string& args) { return run(DINO_TRAIN_EXE, args); }
result eval(const std::string& args) { return run(DINO_EVAL_EXE, args); }

void put_be32(std::vector<std::uint8_t>& b, std::uint32_t v) {
  for (int s = 24; s >= 0; s -= 8) b.push_back(std::uint8_t(v >> s));
}

// n images of the four shape classes (shapes.hpp) as IDX files, as fashion_mnist() reads them.
void write_split(const fs::path& dir, const std::string& stem, int n, std::uint32_t seed) {
  const dino_test::shape_set s = dino_test::shape_images(n, seed);
  std::vector<std::uint8_t> img, lab;
  put_be32(img, 2051), put_be32(img, std::uint32_t(n)), put_be32(img, 28), put_be32(img, 28);
  put_be32(lab, 2049), put_be32(lab, std::uint32_t(n));
  img.insert(img.end(), s.pixels.begin(), s.pixels.end());
  for (int c : s.labels) lab.push_back(std::uint8_t(c));
  std::ofstream(dir / (stem + "-images-idx3-ubyte"), std::ios::binary).write(reinterpret_cast<const char*>(img.data()), std::streamsize(img.size()));
  std::ofstream(dir / (stem + "-labels-idx1-ubyte"), std::ios::binary).write(reinterpret_cast<const char*>(lab.data()), std::streamsize(lab.size()));
}

// A number after "key": in a JSON text (the first occurrence); NaN when absent.
double json_num(const std::string& text, const std::string& key, std::size_t from = 0) {
  const auto p = text.find("\"" + key + "\":", from);
  if (p == std::string::npos) return NAN;
  return std::strtod(text.c_str() + p + key.size() + 3, nullptr);
}

// Width and height from a PNG's IHDR; 0 x 0 when the file is not a PNG.
std::pair<int, int> png_size(const std::string& path) {
  const std::string b = slurp(path);
  if (b.size() < 24 || b.compare(0, 8, "\x89PNG\r\n\x1a\n") != 0 || b.compare(12, 4, "IHDR") != 0) return {0, 0};
  auto be = [&](std::size_t o) {
    return int(std::uint8_t(b[o])) << 24 | int(std::uint8_t(b[o + 1])) << 16 | int(std::uint8_t(b[o + 2])) << 8 |
           int(std::uint8_t(b[o + 3]));
  };
  return {be(16), be(20)};
}

// A fresh data folder kDir/<name> of train and t10k splits, and an empty run folder kDir/<run>.
fs::path fresh_data(const std::string& name, const std::string& run, int n_train, int n_test, std::uint32_t seed) {
  const fs::path data = fs::path(kDir) / name;
  fs::remove_all(data);
  fs::remove_all(fs::path(kDir) / run);
  fs::create_directories(data);
  write_split(data, "train", n_train, seed);
  write_split(data, "t10k", n_test, seed + 1);
  return data;
}

std::size_t lines(const std::string& path) {
  std::size_t n = 0;
  for (char c : slurp(path)) n += c == '\n';
  return n;
}
}  // namespace

// The loss, teacher entropy and KL fields of every line of a log.jsonl, as written.
static std::vector<std::string> log_numbers(const std::string& path) {
  std::vector<std::string> out;
  const std::string text = slurp(path);
  for (const char* key : {"\"loss\": ", "\"teacher_entropy\": ", "\"kl\": "})
    for (std::size_t p = text.find(key); p != std::string::npos; p = text.find(key, p + 1)) {
      const std::size_t b = p + std::strlen(key);
      out.push_back(text.substr(b, text.find(',', b) - b));
    }
  return out;
}

TEST_CASE("dino-train --checkpoint-blocks: the same log and checkpoint, fewer activations kept") {
  const fs::path data = fresh_data("data_ckpt", "run_ckpt", 32, 8, 3);
  const std::string flags = " --data mnist --data-path " + data.string() +
                            " --arch vit_tiny28 --out-dim 64 --head-hidden 32 --head-bottleneck 16 --local-crops 2"
                            " --batch-size 16 --warmup-epochs 0 --epochs 1 --threads 2 --log-every 1 --output ";
  // a fresh run folder kDir/name trained with the flags and extra; it must succeed
  const auto fresh_run = [&](const char* name, const std::string& extra) {
    const fs::path p = fs::path(kDir) / name;
    fs::remove_all(p);
    auto r = train(flags + p.string() + extra);
    INFO(r.err);
    REQUIRE(r.code == 0);
    return std::pair{p, r};
  };
  // two runs wrote the same log numbers and the same checkpoint
  const auto same_run = [](const fs::path& p, const fs::path& q) {
    CHECK(log_numbers((p / "log.jsonl").string()) == log_numbers((q / "log.jsonl").string()));
    CHECK(slurp((p / "checkpoint.safetensors").string()) == slurp((q / "checkpoint.safetensors").string()));
  };
  const auto [a, r0] = fresh_run("run_ckpt", "");
  const auto [b, r1] = fresh_run("run_ckpt_all", " --checkpoint-blocks 4");  // every block of vit_tiny28
  const auto n0 = log_numbers((a / "log.jsonl").string());
  CHECK(n0.size() == 3 * 2);
  same_run(a, b);
  // the start-up line's "activations kept for the backward N" (MiB) shrinks
  const auto kept = [](const std::string& err) {
    const std::string key = "activations kept for the backward ";
    const auto p = err.find(key);
    return p == std::string::npos ? NAN : std::strtod(err.c_str() + p + key.size(), nullptr);
  };
  CHECK(kept(r1.err) < kept(r0.err));
  // --recompute-pointwise with one block checkpointed: the same log and checkpoint again
  // (the CPU's GELU derivative is then evaluated in the backward, not kept), and fewer kept
  // activations than checkpointing that block alone would leave
  const auto [d, rp] = fresh_run("run_pointwise", " --checkpoint-blocks 1 --recompute-pointwise");
  same_run(d, a);
  CHECK(kept(rp.err) < kept(r0.err));
  CHECK(kept(rp.err) > kept(r1.err));
  auto r2 = train(flags + b.string() + " --checkpoint-blocks 5");
  CHECK(r2.code == 2);
  CHECK(r2.err.find("--checkpoint-blocks 5 exceeds the ViT's depth 4") != std::string::npos);
  // --bf16: the same run on bf16 GEMM operands: it trains, its numbers differ a little, and
  // run.json says which precision ran
  const auto [c, r3] = fresh_run("run_bf16", " --bf16");
  const auto n3 = log_numbers((c / "log.jsonl").string());
  REQUIRE(n3.size() == n0.size());
  CHECK(n3 != n0);
  CHECK(std::fabs(std::stod(n3[0]) - std::stod(n0[0])) < 0.05 * std::fabs(std::stod(n0[0])));  // the first loss
  CHECK(slurp((c / "run.json").string()).find("\"precision\": \"bf16\"") != std::string::npos);
  CHECK(slurp((a / "run.json").string()).find("\"precision\": \"fp32\"") != std::string::npos);
  CHECK(r3.err.find("GEMMs bf16") != std::string::npos);
  // --bf16-operands (the bf16 products' operands stored as bf16 by their producers) with
  // --recompute-pointwise, against --bf16 with --recompute-pointwise: the same log and checkpoint
  const auto [e, r4] = fresh_run("run_bf16_pw", " --bf16 --recompute-pointwise");
  const auto [g, r5] = fresh_run("run_bf16_ops", " --bf16 --bf16-operands --recompute-pointwise");
  same_run(g, e);
  CHECK(log_numbers((g / "log.jsonl").string()) != n0);  // bf16, not fp32
  auto r6 = train(flags + g.string() + " --bf16-operands");
  CHECK(r6.code == 2);
  CHECK(r6.err.find("--bf16-operands needs --bf16") != std::string::npos);
  // --bf16-staged: on the CPU the bf16 products round their operands so already, so the same
  // log and checkpoint as --bf16; without --bf16 it is refused
  const auto [h, r7] = fresh_run("run_bf16_staged", " --bf16 --bf16-staged");
  same_run(h, c);
  auto r8 = train(flags + h.string() + " --bf16-staged");
  CHECK(r8.code == 2);
  CHECK(r8.err.find("--bf16-staged needs --bf16") != std::string::npos);
  // --cuda-graphs: CUDA graphs only; on the CPU refused before anything runs
  auto r9 = train(flags + h.string() + " --cuda-graphs");
  CHECK(r9.code == 2);
  CHECK(r9.err.find("--cuda-graphs needs --device cuda") != std::string::npos);
}

TEST_CASE("dino-train stops on SIGTERM with its state saved, and says so in its exit code") {
  const fs::path data = fresh_data("data_sig", "run_sig", 32, 8, 5), runp = fs::path(kDir) / "run_sig";
  const std::string cmd = std::string(DINO_TRAIN_EXE) + " --data mnist --data-path " + data.string() +
                          " --arch vit_tiny28 --out-dim 64 --head-hidden 32 --head-bottleneck 16 --local-crops 2"
                          " --batch-size 16 --warmup-epochs 0 --epochs 30 --threads 2 --log-every 1 --output " +
                          runp.string();
  const std::string log = (runp / "log.jsonl").string(), code = kDir + "/sig_code.txt";
  // start it, wait for its first step's line (at most 60 s), send SIGTERM, keep its exit code
  const std::string sh = "sh -c '" + cmd + " > " + kDir + "/sig_out.txt 2> " + kDir + "/sig_err.txt & p=$!; i=0; " +
                         "while [ ! -s " + log + " ] && [ $i -lt 1200 ]; do sleep 0.05; i=$((i+1)); done; " +
                         "kill -TERM $p; wait $p; echo $? > " + code + "'";
  REQUIRE(std::system(sh.c_str()) == 0);
  const std::string err = slurp(kDir + "/sig_err.txt");
  INFO(err);
  CHECK(std::atoi(slurp(code).c_str()) == 128 + SIGTERM);
  CHECK(err.find("stopped by a signal") != std::string::npos);
  // the state of the last step run is saved: checkpoint, run.json and log agree, short of the 60 steps
  const std::string run_json = slurp((runp / "run.json").string());
  const double next = json_num(run_json, "next_step");
  CHECK(next >= 1);
  CHECK(next < 60);
  CHECK(double(lines(log)) == next);
  CHECK(json_num(slurp((runp / "checkpoint.safetensors.json").string()), "iteration") == next);
  CHECK(run_json.find("\"finished\": false") != std::string::npos);
}

TEST_CASE("dino-train and dino-eval end to end on a synthetic IDX data set") {
  const fs::path data = fresh_data("data", "run", 64, 32, 1), runp = fs::path(kDir) / "run";
  const std::string run_dir = runp.string(), data_flags = " --data mnist --data-path " + data.string();
  const std::string model = " --arch vit_tiny28 --out-dim 64 --head-hidden 32 --head-bottleneck 16 --local-crops 2"
                            " --batch-size 16 --warmup-epochs 0 --threads 2 --log-every 1 --output " + run_dir;

  // 1 epoch of 4 steps, then --resume with a second epoch: the log grows to 8 steps.
  auto r = train(data_flags + model + " --epochs 1");
  INFO(r.err);
  REQUIRE(r.code == 0);
  REQUIRE(fs::exists(runp / "checkpoint.safetensors"));
  REQUIRE(fs::exists(runp / "run.json"));
  CHECK(lines((runp / "log.jsonl").string()) == 4);
  r = train(data_flags + model + " --epochs 2 --resume");
  INFO(r.err);
  REQUIRE(r.code == 0);
  CHECK(r.err.find("resuming") != std::string::npos);
  CHECK(lines((runp / "log.jsonl").string()) == 8);
  CHECK(json_num(slurp((runp / "run.json").string()), "next_step") == 8);

  // knn on the checkpoint (and a point on the k-NN curve), the random init and the raw pixels.
  r = eval("knn --run " + run_dir + data_flags + " --k 1,5,20 --append-curve");
  INFO(r.err);
  REQUIRE(r.code == 0);
  std::string js = slurp((runp / "knn.json").string());
  CHECK(json_num(js, "step") == 8);
  CHECK(json_num(js, "train_samples") == 64);
  CHECK(json_num(js, "test_samples") == 32);
  for (const char* k : {"\"k\": 1,", "\"k\": 5,", "\"k\": 20,"}) {
    CAPTURE(k);
    const auto at = js.find(k);
    REQUIRE(at != std::string::npos);
    const double top1 = json_num(js, "top1", at);
    CHECK(top1 >= 0.0);
    CHECK(top1 <= 1.0);
  }
  CHECK(r.out.find("top-1") != std::string::npos);
  CHECK(lines((runp / "knn_curve.jsonl").string()) == 1);

  r = eval("knn --run " + run_dir + data_flags + " --random-init 0 --k 5 --test-samples 16");
  INFO(r.err);
  REQUIRE(r.code == 0);
  js = slurp((runp / "knn-random-init.json").string());
  CHECK(json_num(js, "test_samples") == 16);
  CHECK(json_num(js, "seed") == 0);
  CHECK(json_num(js, "top1") >= 0.0);

  r = eval("knn --run " + run_dir + data_flags + " --raw-pixels --k 5");
  INFO(r.err);
  REQUIRE(r.code == 0);
  js = slurp((runp / "knn-raw-pixels.json").string());
  const double raw = json_num(js, "top1", js.find("\"raw_l1\""));
  CHECK(raw > 0.5);  // four distinct shapes: the pixels alone separate them
  CHECK(raw <= 1.0);

  // linear probe, a few epochs
  r = eval("linear --run " + run_dir + data_flags + " --probe-epochs 5 --probe-batch 16 --n-last-blocks 2");
  INFO(r.err);
  REQUIRE(r.code == 0);
  js = slurp((runp / "linear.json").string());
  CHECK(json_num(js, "feature_dim") == 192);
  for (const char* k : {"train_top1", "test_top1"}) {
    CHECK(json_num(js, k) >= 0.0);
    CHECK(json_num(js, k) <= 1.0);
  }

  // attention maps of 3 test images: PNGs and the Jaccard index against the foreground
  const std::string att = (runp / "att").string();
  r = eval("attention --run " + run_dir + data_flags + " --images 3 --out-dir " + att);
  INFO(r.err);
  REQUIRE(r.code == 0);
  js = slurp(att + "/attention.json");
  const double jac = json_num(js, "mean", js.find("\"jaccard\""));
  CHECK(jac >= 0.0);
  CHECK(jac <= 1.0);
  CHECK(json_num(js, "head_mean_map") >= 0.0);
  CHECK(json_num(js, "images") == 3);
  CHECK(png_size(att + "/grid.png").first > 0);
  CHECK(png_size(att + "/img000-heads.png").first > 0);
  CHECK(png_size(att + "/img002-head2.png") == std::pair<int, int>{112, 112});  // 28 px at scale 4
  // --pictures: the PNGs of the first images only (the grid one row), the Jaccard of all of them
  const std::string att1 = (runp / "att1").string();
  r = eval("attention --run " + run_dir + data_flags + " --images 3 --pictures 1 --out-dir " + att1);
  INFO(r.err);
  REQUIRE(r.code == 0);
  const std::string js1 = slurp(att1 + "/attention.json");
  CHECK(json_num(js1, "images") == 3);
  CHECK(json_num(js1, "pictures") == 1);
  CHECK(json_num(js1, "mean", js1.find("\"jaccard\"")) == doctest::Approx(jac));
  CHECK(fs::exists(att1 + "/img000-heads.png"));
  CHECK_FALSE(fs::exists(att1 + "/img001-heads.png"));
  CHECK(png_size(att1 + "/grid.png").first == png_size(att + "/grid.png").first);
  CHECK(png_size(att1 + "/grid.png").second < png_size(att + "/grid.png").second);
  r = eval("attention --run " + run_dir + data_flags + " --images 3 --pictures 0 --out-dir " + att1 + "0");
  INFO(r.err);
  REQUIRE(r.code == 0);
  CHECK(slurp(att1 + "0/attention.json").find("\"grid\": null") != std::string::npos);
  CHECK_FALSE(fs::exists(att1 + "0/grid.png"));

  // curves: loss.png from log.jsonl, knn.png from knn_curve.jsonl
  r = eval("curves --run " + run_dir);
  INFO(r.err);
  REQUIRE(r.code == 0);
  CHECK(png_size((runp / "loss.png").string()) == std::pair<int, int>{1000, 600});
  CHECK(png_size((runp / "knn.png").string()) == std::pair<int, int>{1000, 600});
}

TEST_CASE("dino-train --method dino_attention_mask and its --mask-ratio") {
  const fs::path data = fresh_data("data_mask", "run_mask", 32, 8, 3), runp = fs::path(kDir) / "run_mask";
  const std::string args = " --data mnist --data-path " + data.string() +
                           " --arch vit_tiny28 --out-dim 32 --head-hidden 32 --head-bottleneck 16 --local-crops 2"
                           " --batch-size 16 --warmup-epochs 0 --threads 2 --epochs 1 --output " + runp.string();
  auto r = train(args + " --method dino_attention_mask --mask-ratio 0.5");
  INFO(r.err);
  REQUIRE(r.code == 0);
  CHECK(lines((runp / "log.jsonl").string()) == 2);
  CHECK(slurp((runp / "run.json").string()).find("\"method\": \"dino_attention_mask\"") != std::string::npos);
  r = train(args + " --method dino_attention_mask --mask-ratio 1");
  CHECK(r.code == 1);
  CHECK(r.err.find("--mask-ratio must be in [0, 1), got 1") != std::string::npos);
  r = train(args + " --method dino --mask-ratio 0.5");
  CHECK(r.code == 2);
  CHECK(r.err.find("--mask-ratio applies to --method dino_attention_mask only") != std::string::npos);
}

TEST_CASE("dino-eval refuses bad input with exit code 1 or 2 and a message") {
  auto r = eval("");
  CHECK(r.code == 2);
  CHECK(r.err.find("no MODE") != std::string::npos);
  r = eval("frobnicate --run x");
  CHECK(r.code == 2);
  CHECK(r.err.find("unknown mode 'frobnicate'") != std::string::npos);
  r = eval("knn --no-such-flag 1");
  CHECK(r.code == 2);
  CHECK(r.err.find("unknown option --no-such-flag") != std::string::npos);
  r = eval("knn --k 0,x");
  CHECK(r.code == 2);
  CHECK(r.err.find("--k") != std::string::npos);
  r = eval("knn");  // no model
  CHECK(r.code == 2);
  CHECK(r.err.find("--run") != std::string::npos);
  const std::string missing = kDir + "/no-such-checkpoint.safetensors";
  r = eval("knn --checkpoint " + missing + " --arch vit_tiny28");
  CHECK(r.code == 1);
  CHECK(r.err.find(missing) != std::string::npos);
  r = eval("curves --run " + kDir + "/no-such-run");
  CHECK(r.code == 1);
  CHECK(r.err.find("log.jsonl") != std::string::npos);
  r = eval("knn --raw-pixels --data mnist --data-path " + kDir + "/no-such-data");
  CHECK(r.code == 1);
  CHECK(r.err.find("no-such-data") != std::string::npos);
  r = eval("--help");
  CHECK(r.code == 0);
  for (const char* flag : {"--run", "--checkpoint", "--random-init", "--raw-pixels", "--test-samples", "--images", "--out-dir"})
    CHECK(r.out.find(flag) != std::string::npos);
}

TEST_CASE("dino-train --accumulate: micro-batches per step, schedules in steps, resume, bad values") {
  const fs::path data = fs::path(kDir) / "data-accumulate", runp = fs::path(kDir) / "run-accumulate";
  fs::remove_all(data);
  fs::remove_all(runp);
  fs::create_directories(data);
  write_split(data, "train", 72, 3);
  const std::string flags = " --data mnist --data-path " + data.string() +
                            " --arch vit_tiny28 --out-dim 64 --head-hidden 32 --head-bottleneck 16 --local-crops 2"
                            " --batch-size 8 --accumulate 2 --warmup-epochs 0 --threads 2 --log-every 1 --output " +
                            runp.string();
  // 72 images: 9 batches of 8 an epoch, 4 steps of 16 images (the 9th batch is not used).
  auto r = train(flags + " --epochs 1");
  INFO(r.err);
  REQUIRE(r.code == 0);
  CHECK(r.err.find("batch 16 (8 x --accumulate 2); 1 epochs x 4 steps") != std::string::npos);
  CHECK(lines((runp / "log.jsonl").string()) == 4);
  std::string js = slurp((runp / "run.json").string());
  CHECK(json_num(js, "batch_size") == 8);
  CHECK(json_num(js, "accumulate") == 2);
  CHECK(json_num(js, "steps_per_epoch") == 4);
  r = train(flags + " --epochs 2 --resume");
  INFO(r.err);
  REQUIRE(r.code == 0);
  CHECK(r.err.find("resuming") != std::string::npos);
  CHECK(lines((runp / "log.jsonl").string()) == 8);
  CHECK(json_num(slurp((runp / "run.json").string()), "next_step") == 8);

  r = train(flags + " --epochs 1 --accumulate 0");
  CHECK(r.code == 2);
  CHECK(r.err.find("--accumulate must be an integer >= 1") != std::string::npos);
  r = train(flags + " --epochs 1 --accumulate 10");
  CHECK(r.code == 1);
  CHECK(r.err.find("--accumulate 10 is larger than the 9 batches of 8 images") != std::string::npos);
  r = train("--help");
  CHECK(r.code == 0);
  CHECK(r.out.find("--accumulate") != std::string::npos);
}

TEST_CASE("every flag of dino-train's and dino-eval's --help is documented in docs/tools.md") {
  const std::string doc = slurp(DINO_TOOLS_DOC);
  REQUIRE(!doc.empty());
  for (const auto& r : {train("--help"), eval("--help")}) {
    REQUIRE(r.code == 0);
    // the option lines of --help: "  --name   text"
    std::istringstream lines_in(r.out);
    std::string line;
    int flags = 0;
    while (std::getline(lines_in, line)) {
      if (line.rfind("  --", 0) != 0) continue;
      const std::string flag = line.substr(2, line.find(' ', 2) - 2);
      CAPTURE(flag);
      // a table row's first cell: `--name` or `--name ARG`
      CHECK((doc.find("`" + flag + "`") != std::string::npos || doc.find("`" + flag + " ") != std::string::npos));
      ++flags;
    }
    CHECK(flags > 10);
  }
}
