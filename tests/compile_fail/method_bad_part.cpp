// Must not compile: a method whose Loss is not a distillation loss.
#include <dino/dino.hpp>

struct not_a_loss {};

int main() {
  using bad = dino::ssl::method<dino::nn::mlp, dino::ssl::dino_head, dino::ssl::centering<float>, not_a_loss,
                                dino::ssl::ema_update>;
  bad* p = nullptr;
  (void)sizeof(*p);
}
