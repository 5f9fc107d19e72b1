// Must not compile: a CPU operation handed a device_space view.
#include <dino/dino.hpp>

int main() {
  float buf[4] = {};
  dino::device_view<float> a{buf, {4}, "a"};
  dino::device_view<float> y{buf, {4}, "y"};
  dino::nn::gelu_forward(dino::cpu_policy{1}, dino::device_view<const float>(a), y);
}
