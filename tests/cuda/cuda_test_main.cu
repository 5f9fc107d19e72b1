// doctest main for the GPU test binaries: without a CUDA device the binary says so and
// exits with 77, which ctest reports as "Skipped" (SKIP_RETURN_CODE), never as passed.
#define DOCTEST_CONFIG_IMPLEMENT
#include <doctest/doctest.h>

#include <cstdio>

#include <dino/policy/cuda/policy.cuh>

int main(int argc, char** argv) {
  if (!dino::cuda_device_available()) {
    std::printf("SKIPPED: no CUDA device on this machine; these GPU tests did not run\n");
    return 77;
  }
  doctest::Context ctx(argc, argv);
  return ctx.run();
}
