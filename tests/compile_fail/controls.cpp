// The compile-fail sources with their mistakes corrected: this one must build, so that the
// failures are caused by the mistakes and not by something else in those files.
#include <dino/dino.hpp>

int main() {
  float buf[4] = {};
  dino::host_view<float> a{buf, {4}, "a"};
  dino::host_view<float> y{buf, {4}, "y"};
  dino::nn::gelu_forward(dino::cpu_policy{1}, dino::host_view<const float>(a), y);
  using good = dino::ssl::method<dino::nn::mlp, dino::ssl::dino_head, dino::ssl::centering<float>,
                                 dino::ssl::cross_entropy_distillation, dino::ssl::ema_update>;
  good* p = nullptr;
  (void)sizeof(*p);
}
