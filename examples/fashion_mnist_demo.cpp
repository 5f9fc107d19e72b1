// fashion_mnist_demo: DINO on Fashion-MNIST on the CPU within a time budget, then what it
// learned, measured (the README's demo; `bash scripts/demo`).
//
//   fashion_mnist_demo [--minutes 10] [--output demo-output] [--threads 2] [--loader-threads 1]
//                      [--seed 0] [--batch-size 64] [--local-crops 6] [--eval-train 60000]
//                      [--eval-test 10000] [--attention-images 1000]
//
// 1. k-NN top-1 (weighted, k = 20, T = 0.07, cosine; dino-spec §5.1) of the raw pixels and of
//    the ViT at its random initialisation; the attention-mask Jaccard of the random ViT.
// 2. DINO training (ViT D 96, depth 4, 3 heads, patch 4; 2 x 28 + 6 x 12 crops, --local-crops
//    sets the 6; K = 1024) for
//    the budget: a short calibration measures the step time, and the schedules (linear lr
//    warm-up over 10 % of the steps then cosine; weight decay 0.04 -> 0.4; teacher momentum
//    0.99 -> 1) are laid over the number of steps that fit. A cheap k-NN (5,000 / 1,000
//    images) is taken four times along the way for the curve.
// 3. The same measures for the trained teacher; PNGs of the loss and k-NN curves and of the
//    attention maps; everything in <output>/summary.json.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include <dino/data.hpp>
#include <dino/dino.hpp>
#include <dino/eval/attention.hpp>
#include <dino/eval/attention_png.hpp>
#include <dino/eval/knn.hpp>
#include <dino/io/plot.hpp>
#include <dino/train/features.hpp>
#include <dino/train/trainer.hpp>

#include "../tools/cli.hpp"

namespace {

using method_t = dino::ssl::dino_method<dino::nn::vit>;

struct measures {
  double knn = 0, jaccard = 0;
};

dino::nn::vit_config demo_vit() {
  dino::nn::vit_config c = dino::nn::vit_small28(4);
  c.embed_dim = 96;
  c.depth = 4;
  c.heads = 3;
  c.drop_path_rate = 0.1;
  return c;
}

dino::ssl::dino_config demo_config(std::int64_t batch, std::uint64_t seed, int local_crops) {
  dino::ssl::dino_config c;
  c.head.out_dim = 1024;
  c.head.hidden_dim = 256;
  c.head.bottleneck_dim = 64;
  c.local_crops = local_crops;
  c.train.max_batch = batch;
  c.train.seed = seed;
  c.train.crops = {28, 12};
  c.train.freeze_last_layer = 1;  // one schedule "epoch" = 5 % of the steps (set below)
  c.train.schedule.epochs = 1;
  c.train.schedule.iters_per_epoch = 1;
  c.train.schedule.warmup_epochs = 0;
  return c;
}

// The schedules over `total` steps (see the header comment).
dino::ssl::dino_schedules demo_schedules(std::int64_t total, std::int64_t batch) {
  dino::ssl::dino_schedules s;
  const std::int64_t warm = std::max<std::int64_t>(1, total / 10);
  const double peak = 4e-3 * double(batch) / 256.0;  // 8x the reference's 5e-4 per 256 images: a short run
  s.lr = dino::ssl::linspace(0.0, peak, warm);
  auto cos = dino::ssl::cosine_schedule(peak, 1e-5, 1, total - warm);
  s.lr.insert(s.lr.end(), cos.begin(), cos.end());
  s.wd = dino::ssl::cosine_schedule(0.04, 0.4, 1, total);
  s.momentum = dino::ssl::cosine_schedule(0.99, 1.0, 1, total);
  s.iters_per_epoch = std::max<std::int64_t>(1, total / 20);
  s.teacher_temp.assign(std::size_t(total / s.iters_per_epoch + 1), 0.04);
  return s;
}

// Weighted k-NN top-1 (k = 20) and the attention Jaccard of the teacher backbone.
measures evaluate(const dino::cpu_policy& pol, method_t& m, const dino::data::array_dataset& train,
                  const dino::data::array_dataset& test, std::int64_t n_train, std::int64_t n_test, std::int64_t n_att,
                  const std::string& label, const std::string& png = "") {
  const auto& vit = m.backbone();
  const std::int64_t D = vit.out_dim();
  const dino::host_view<const float> P{m.teacher().data(), {std::int64_t(m.teacher().size())}, "teacher"};
  const std::vector<float> mean{0.2860f}, stdev{0.3530f};
  std::vector<float> ftr(std::size_t(n_train * D)), fte(std::size_t(n_test * D));
  dino::train::extract_features(pol, vit, P, train, n_train, mean, stdev, 256, ftr.data(), nullptr, (label + ": train features").c_str());
  const std::int64_t heads = vit.config().heads, grid = 28 / vit.config().patch, per = heads * (1 + grid * grid);
  std::vector<float> att(std::size_t(std::max(n_att, n_test) * per));
  dino::train::extract_features(pol, vit, P, test, n_test, mean, stdev, 256, fte.data(), att.data(), (label + ": test features").c_str());
  std::vector<int> ltr(train.labels().begin(), train.labels().begin() + n_train),
      lte(test.labels().begin(), test.labels().begin() + n_test);
  const auto r = dino::eval::knn_classify(pol, ftr.data(), ltr.data(), n_train, fte.data(), lte.data(), n_test, D, 10, {20});
  measures out;
  out.knn = r.at(20).top1;
  const std::int64_t na = std::min(n_att, n_test);
  out.jaccard = dino::eval::attention_jaccard_foreground(att.data(), na, int(heads), int(grid), int(grid),
                                                         int(vit.config().patch), test.data(0))
                    .mean;
  if (!png.empty())
    dino::eval::write_attention_grid(png, test.data(0), 8, 28, 28, att.data(), int(heads), int(grid), int(grid),
                                     int(vit.config().patch));
  return out;
}

int run(int argc, char** argv) {
  dino_cli::flags f("fashion_mnist_demo", "[options]");
  f.add("minutes", "10", "training budget in minutes")
      .add("output", "demo-output", "output folder")
      .add("threads", "2", "compute threads")
      .add("loader-threads", "1", "data loading threads")
      .add("seed", "0", "seed")
      .add("batch-size", "64", "images per step")
      .add("local-crops", "6", "local crops (12 px) per image beside the two global ones (28 px); 0: the global crops alone")
      .add("eval-train", "60000", "k-NN memory bank: the first N training images")
      .add("eval-test", "10000", "k-NN queries: the first N test images")
      .add("attention-images", "1000", "test images for the attention-mask Jaccard");
  if (!f.parse(argc, argv)) return 0;
  const std::string out = f.str("output");
  std::filesystem::create_directories(out);
  const dino::cpu_policy pol{int(f.integer("threads", 1))};
  const std::uint64_t seed = std::uint64_t(f.integer("seed"));
  const std::int64_t B = f.integer("batch-size", 2);
  const int n_local = int(f.integer("local-crops", 0));
  const auto train = dino::data::fashion_mnist("/usr/share/datasets/fashion-mnist", true);
  const auto test = dino::data::fashion_mnist("/usr/share/datasets/fashion-mnist", false);
  const std::int64_t n_train = std::min<std::int64_t>(f.integer("eval-train", 1), train.size()),
                     n_test = std::min<std::int64_t>(f.integer("eval-test", 1), test.size()),
                     n_att = std::min<std::int64_t>(f.integer("attention-images", 1), n_test);
  std::fprintf(stderr, "Fashion-MNIST: %lld training and %lld test images (k-NN: %lld / %lld)\n", (long long)train.size(),
               (long long)test.size(), (long long)n_train, (long long)n_test);

  // 1. Raw pixels.
  std::vector<float> ptr(std::size_t(n_train * 784)), pte(std::size_t(n_test * 784));
  for (std::int64_t i = 0; i < n_train * 784; ++i) ptr[std::size_t(i)] = float(train.data(0)[i]);
  for (std::int64_t i = 0; i < n_test * 784; ++i) pte[std::size_t(i)] = float(test.data(0)[i]);
  std::vector<int> ltr(train.labels().begin(), train.labels().begin() + n_train),
      lte(test.labels().begin(), test.labels().begin() + n_test);
  const double raw = dino::eval::knn_classify(pol, ptr.data(), ltr.data(), n_train, pte.data(), lte.data(), n_test, 784,
                                              10, {20})
                         .at(20)
                         .top1;
  std::fprintf(stderr, "k-NN top-1, raw pixels: %.4f\n", raw);

  // 2. The ViT at initialisation (teacher = student).
  auto model = dino::ssl::make_dino<dino::nn::vit>(demo_vit(), 96, demo_config(B, seed, n_local));
  const measures rnd = evaluate(pol, model, train, test, n_train, n_test, n_att, "random init", out + "/attention-random-init.png");
  std::fprintf(stderr, "random-init ViT: k-NN top-1 %.4f, attention Jaccard %.4f\n", rnd.knn, rnd.jaccard);

  // 3. Calibrate the step time on a throwaway copy, then lay the schedules over the budget.
  dino::data::loader_config lc;
  lc.batch_size = B;
  lc.threads = int(f.integer("loader-threads", 1));
  lc.seed = seed;
  double step_s = 0;
  {
    auto probe = dino::ssl::make_dino<dino::nn::vit>(demo_vit(), 96, demo_config(B, seed, n_local));
    probe.set_schedules(demo_schedules(100, B));
    dino::data::multicrop_loader<dino::data::array_dataset> loader(train, dino::data::multicrop_28px(n_local), lc);
    for (int i = 0; i < 4; ++i) {
      auto b = loader.next();
      const auto t0 = std::chrono::steady_clock::now();
      probe.step(pol, dino::ssl::image_crops<float>{b.global, b.local});
      const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      if (i >= 1) step_s = i == 1 ? dt : std::min(step_s, dt);
    }
  }
  const double budget = f.num("minutes") * 60.0;
  const std::int64_t total = std::max<std::int64_t>(20, std::int64_t(budget / (step_s * 1.08)));
  model.set_schedules(demo_schedules(total, B));
  std::fprintf(stderr, "step time %.3f s: %lld steps (%.2f epochs) fit in %.1f minutes\n", step_s, (long long)total,
               double(total * B) / double(train.size()), budget / 60.0);

  // 4. Train, with a cheap k-NN four times along the way.
  std::vector<dino::io::series> curves(1);
  curves[0].name = "k-NN top-1 (5,000 / 1,000 images)";
  std::ofstream kc(out + "/knn_curve.jsonl");
  auto cheap = [&](std::int64_t step) {
    const measures q = evaluate(pol, model, train, test, std::min<std::int64_t>(5000, n_train),
                                std::min<std::int64_t>(1000, n_test), 1, "k-NN curve");
    curves[0].x.push_back(double(step));
    curves[0].y.push_back(q.knn);
    kc << "{\"step\": " << step << ", \"knn_top1\": " << q.knn << "}\n";
    kc.flush();
  };
  cheap(0);
  dino::data::multicrop_loader<dino::data::array_dataset> loader(train, dino::data::multicrop_28px(n_local), lc);
  dino::train::run_config rc;
  rc.out_dir = out;
  rc.seed = seed;
  rc.time_limit_s = budget * 2.0;  // a guard only: the schedules are sized to end within the budget
  rc.log_every = 50;
  const std::int64_t every = std::max<std::int64_t>(1, total / 4);
  rc.after_step = [&](const dino::ssl::step_stats& st) {
    if ((st.iteration + 1) % every == 0 && st.iteration + 1 < total) cheap(st.iteration + 1);
  };
  std::remove((out + "/log.jsonl").c_str());
  const auto sum = dino::train::run(pol, model, loader, rc);
  cheap(model.iteration());

  // 5. The trained teacher.
  const measures dino_m = evaluate(pol, model, train, test, n_train, n_test, n_att, "DINO", out + "/attention-dino.png");
  std::fprintf(stderr, "DINO ViT: k-NN top-1 %.4f, attention Jaccard %.4f\n", dino_m.knn, dino_m.jaccard);

  // 6. Pictures and the summary.
  std::vector<dino::io::series> loss(3);
  loss[0].name = "loss";
  loss[1].name = "teacher entropy";
  loss[2].name = "KL(teacher || student)";
  {
    std::ifstream log(out + "/log.jsonl");
    std::string line;
    auto field = [&](const std::string& l, const char* k) {
      auto p = l.find(std::string("\"") + k + "\": ");
      return p == std::string::npos ? NAN : std::atof(l.c_str() + p + std::strlen(k) + 4);
    };
    while (std::getline(log, line)) {
      const double s = field(line, "step");
      loss[0].x.push_back(s), loss[0].y.push_back(field(line, "loss"));
      loss[1].x.push_back(s), loss[1].y.push_back(field(line, "teacher_entropy"));
      loss[2].x.push_back(s), loss[2].y.push_back(field(line, "kl"));
    }
  }
  dino::io::plot_png(out + "/loss.png", "DINO on Fashion-MNIST", "step", "nats", loss);
  dino::io::plot_png(out + "/knn.png", "k-NN top-1 of the teacher during training", "step", "top-1", curves);
  std::ofstream js(out + "/summary.json");
  js << "{\"knn_top1\": {\"raw_pixels\": " << raw << ", \"random_init\": " << rnd.knn << ", \"dino\": " << dino_m.knn
     << "}, \"attention_jaccard\": {\"random_init\": " << rnd.jaccard << ", \"dino\": " << dino_m.jaccard
     << "}, \"train\": {\"steps\": " << sum.steps << ", \"planned_steps\": " << total << ", \"wall_s\": " << sum.wall_s
     << ", \"images_per_s\": " << sum.images_per_s << ", \"loader_wait_fraction\": "
     << (sum.wall_s > 0 ? sum.loader_wait_s / sum.wall_s : 0.0) << ", \"skipped\": " << sum.skipped
     << "}, \"eval\": {\"knn_k\": 20, \"knn_temperature\": 0.07, \"train_images\": " << n_train << ", \"test_images\": "
     << n_test << ", \"attention_images\": " << n_att << ", \"foreground_threshold\": "
     << dino::eval::fashion_mnist_foreground_threshold << "}}\n";
  js.close();
  std::printf("\nDINO on Fashion-MNIST, %lld steps in %.1f minutes (%.0f images/s):\n", (long long)sum.steps,
              sum.wall_s / 60.0, sum.images_per_s);
  std::printf("  k-NN top-1 (k = 20):   raw pixels %.4f   random-init ViT %.4f   DINO ViT %.4f\n", raw, rnd.knn, dino_m.knn);
  std::printf("  attention Jaccard:     random-init ViT %.4f   DINO ViT %.4f\n", rnd.jaccard, dino_m.jaccard);
  std::printf("  pictures: %s/loss.png %s/knn.png %s/attention-random-init.png %s/attention-dino.png\n", out.c_str(),
              out.c_str(), out.c_str(), out.c_str());
  std::printf("  summary:  %s/summary.json   log: %s/log.jsonl   checkpoint: %s\n", out.c_str(), out.c_str(),
              sum.checkpoint.c_str());
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const dino_cli::usage_error& e) {
    std::fprintf(stderr, "fashion_mnist_demo: %s\n", e.what());
    return 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "fashion_mnist_demo: %s\n", e.what());
    return 1;
  }
}
