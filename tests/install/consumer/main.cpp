// Compiles against an installed dino and prints its version.
#include <dino/dino.hpp>

#include <cstdio>

int main() {
  std::printf("%s\n", dino::version_string());
  return 0;
}
