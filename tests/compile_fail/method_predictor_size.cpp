// Must not compile: a predictor whose input size (48) is not the head's output size (64).
#include <dino/dino.hpp>

int main() {
  using head = dino::ssl::fixed_dims<dino::ssl::dino_head, 32, 64>;
  using predictor = dino::ssl::fixed_dims<dino::ssl::mlp_predictor, 48, 64>;
  using bad = dino::ssl::method<dino::nn::mlp, head, dino::ssl::centering<float>, dino::ssl::cross_entropy_distillation,
                                dino::ssl::ema_update, float, dino::cpu_policy, predictor>;
  bad* p = nullptr;
  (void)sizeof(*p);
}
